"""The CPU miniature's tools: a real text-to-image flow model (diffusers' SD3 transformer, pixel space, 16x16
handwritten digits) with a tiny text encoder, a reward CNN and a held-out judge, all small enough to
pretrain, align and study on two CPU cores in minutes (shared/design/MINIATURE.md).

The miniature is a model family like the others: its adapter is ``flowbp_train.models.mini`` (family
``mini``), its rewards ``flowbp_train.rewards.mini`` (``mini``, ``mini_judge``), and ``flowbp-train
recipes/mini/<method>.yaml`` aligns it. This package holds what only the miniature has: the data and the
training of its networks (``pretrain``, ``classifier``), the report of a run (``report``: ``flowbp-mini
report``), its image statistics (``metrics``), the study's measurements (``measure``, ``study``) and the
``flowbp-mini`` command. Nothing under ``models/`` or ``rewards/`` imports it.
"""

#: Where ``flowbp-mini pretrain / train-reward / train-judge`` write when no folder is named: under the
#: current directory, never into the installed package (whose hashes would then vouch for new weights).
DEFAULT_OUT_DIR = "flowbp-mini-weights"
