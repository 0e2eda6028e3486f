"""flowbp_train: the thin trainer around flowbp_kernels (diffusers models, rewards, LoRA, CLI)."""

__version__ = "0.1.0"
