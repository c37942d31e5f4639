"""The one training loop, evaluation, checkpoints."""
