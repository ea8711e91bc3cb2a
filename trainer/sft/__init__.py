"""BranchSFT stage: supervised fine-tuning (and token-level distillation) of one branch with DeepSpeed ZeRO."""
