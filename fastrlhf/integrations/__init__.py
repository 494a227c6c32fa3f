"""fastrlhf's kernels inside other trainers (trl.py: TRL's GRPOTrainer)."""
