"""scaling.device resolved once, on the process that computes: where an in-process run, the
validation, `eval`'s curves and baselines and `bench --eval` put their tensors."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distributed_maml.config import ScalingConfig
from distributed_maml.core import precision as precision_mod
from distributed_maml.errors import ConfigError


@dataclass(frozen=True)
class Compute:
    """A resolved device and precision. Built by `resolve`, passed to every ShardComputer the
    driver makes (and its Learner): one answer for the whole process."""

    device: torch.device
    precision: str = "fp32"


def resolve(scaling: ScalingConfig) -> Compute:
    """scaling.device on this process: "auto" is CUDA when torch sees a GPU, else the CPU.
    "cuda" without one is a one-line error where this process computes the steps (num_workers =
    0); with Ray workers (who hold the GPUs) a driver without one does its own part on its CPU.
    Sets the process's TF32 switches for the precision."""
    available = torch.cuda.is_available()
    if scaling.device == "cuda" and not available and scaling.num_workers == 0:
        raise ConfigError(
            "scaling.device = 'cuda' but this machine has no CUDA device (torch.cuda.is_available() is False); "
            "use 'auto' or 'cpu', or install a CUDA build of PyTorch"
        )
    use_cuda = available and scaling.device in ("cuda", "auto")
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    precision_mod.configure(scaling.precision, device)
    return Compute(device, scaling.precision)
