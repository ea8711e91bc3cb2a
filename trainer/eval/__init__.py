"""Eval stage: benchmark a model on math, multiple-choice and code sets; pass@1 averaged over k samples."""
