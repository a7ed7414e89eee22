"""Training: the run folder and its lock, checkpoints, the training loop, validation, TensorBoard scalars."""
