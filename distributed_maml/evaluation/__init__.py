"""Evaluation: eval's protocol (adaptation curves, baselines), its numbers and table, the run's plots."""
