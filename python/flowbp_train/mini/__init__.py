"""The CPU miniature: a real text-to-image flow model (diffusers' SD3 transformer, pixel space, 16x16
handwritten digits) with a tiny text encoder, a reward CNN and a held-out judge, all small enough to
pretrain, align and study on two CPU cores in minutes (shared/design/MINIATURE.md)."""
