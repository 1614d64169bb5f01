"""Training: the Accelerate loop, distributed setup, checkpoints and metrics."""
