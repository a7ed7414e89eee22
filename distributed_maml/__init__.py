"""Model-Agnostic Meta-Learning (Finn et al. 2017) as a distributed meta-training system on Ray."""

__version__ = "0.1.0"
