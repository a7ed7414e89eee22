"""The commands and the run folder: CLI, the training loop, evaluation, bench, plots, run
folders, checkpoints and the one-writer lock."""
