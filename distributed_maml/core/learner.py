"""The central learner: the meta-parameters as one flat float32 vector, and the meta-update
(Adam; plain SGD for Reptile). The fan-in before it: core/shards.py."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from distributed_maml.config import MamlConfig
from distributed_maml.core.models import ParamSpec


class Learner:
    """Holds the meta-parameters as one flat float32 tensor and applies the meta-update to it:
    Adam, or for Reptile plain SGD (its outer step, theta -= epsilon * mean(theta - phi))."""

    def __init__(self, spec: ParamSpec, initial: torch.Tensor, lr: float, optimizer: str = "adam") -> None:
        self.spec = spec
        self.flat = initial.detach().to(torch.float32).clone().requires_grad_(True)
        kind = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}[optimizer]
        self.optimizer: torch.optim.Optimizer = kind([self.flat], lr=lr)
        self.version = 0

    @classmethod
    def of(cls, spec: ParamSpec, initial: torch.Tensor, maml: MamlConfig, lr: float) -> Learner:
        """The learner `maml.algorithm` meta-trains with: Adam at `lr`; Reptile: SGD at
        maml.reptile_step."""
        if maml.algorithm == "reptile":
            return cls(spec, initial, maml.reptile_step, "sgd")
        return cls(spec, initial, lr)

    def weights(self) -> np.ndarray:
        """A copy of the current weights (workers must never see a later in-place update)."""
        return self.flat.detach().numpy().copy()

    def apply(self, grad: np.ndarray) -> None:
        self.flat.grad = torch.from_numpy(np.ascontiguousarray(grad, dtype=np.float32)).clone()
        self.optimizer.step()
        self.flat.grad = None
        self.version += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The model's state_dict (parameter name -> tensor), as nn.Module.state_dict gives it."""
        return {k: v.detach().clone() for k, v in self.spec.unflatten(self.flat.detach()).items()}

    def load(self, model_state: dict[str, torch.Tensor], optimizer_state: dict[str, Any], version: int) -> None:
        with torch.no_grad():
            self.flat.copy_(self.spec.flatten(model_state))
        self.optimizer.load_state_dict(optimizer_state)
        self.version = version
