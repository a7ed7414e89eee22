"""Sweeps: the search space and its rules, and `distributed-maml tune` on Ray Tune."""
