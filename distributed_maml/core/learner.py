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
    Adam, or for Reptile plain SGD (its outer step, theta -= epsilon * mean(theta - phi)).

    On a CUDA `device` the weights and the optimizer's state live there (an in-process run on a
    GPU: no host copy per step), and Adam is `capturable`: its step count is a device tensor, so
    the update can be captured in a CUDA graph (execution/devicesteps.py) and never syncs."""

    def __init__(
        self, spec: ParamSpec, initial: torch.Tensor, lr: float, optimizer: str = "adam", device: str = "cpu"
    ) -> None:
        self.spec = spec
        self.device = torch.device(device)
        self.flat = initial.detach().to(self.device, torch.float32).clone().requires_grad_(True)
        kind = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}[optimizer]
        extra = {"capturable": True} if optimizer == "adam" and self.device.type == "cuda" else {}
        self.optimizer: torch.optim.Optimizer = kind([self.flat], lr=lr, **extra)
        self.version = 0

    @classmethod
    def of(cls, spec: ParamSpec, initial: torch.Tensor, maml: MamlConfig, lr: float, device: str = "cpu") -> Learner:
        """The learner `maml.algorithm` meta-trains with: Adam at `lr`; Reptile: SGD at
        maml.reptile_step."""
        if maml.algorithm == "reptile":
            return cls(spec, initial, maml.reptile_step, "sgd", device)
        return cls(spec, initial, lr, device=device)

    def weights(self) -> np.ndarray:
        """A host copy of the current weights (workers must never see a later in-place update).
        On a GPU this waits for the device: callers on the device use `flat` itself."""
        return self.flat.detach().cpu().numpy().copy()

    def snapshot(self) -> np.ndarray | torch.Tensor:
        """The current weights for a computation in this process: a device copy on a GPU (no
        host sync), a host copy on the CPU (what Ray hands to workers)."""
        if self.device.type == "cpu":
            return self.weights()
        return self.flat.detach().clone()

    def apply(self, grad: np.ndarray | torch.Tensor) -> None:
        """One meta-update with the mean meta-gradient `grad` (host array or device tensor)."""
        g = torch.as_tensor(grad if isinstance(grad, torch.Tensor) else np.ascontiguousarray(grad, dtype=np.float32))
        self.flat.grad = g.to(self.device, torch.float32, copy=True)
        self.optimizer.step()
        self.flat.grad = None
        self.version += 1

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The model's state_dict (parameter name -> tensor, on the CPU), as nn.Module.state_dict gives it."""
        return {k: v.detach().cpu().clone() for k, v in self.spec.unflatten(self.flat.detach()).items()}

    def optimizer_state(self) -> dict[str, Any]:
        """The optimizer's state_dict with its tensors on the CPU: a checkpoint written on a GPU
        resumes on a CPU and back (load_state_dict moves them to the weights' device)."""
        return _to_cpu(self.optimizer.state_dict())

    def load(self, model_state: dict[str, torch.Tensor], optimizer_state: dict[str, Any], version: int) -> None:
        with torch.no_grad():
            self.flat.copy_(self.spec.flatten(model_state))
        self.optimizer.load_state_dict(optimizer_state)
        # The saved groups carry the saving learner's `capturable`; this learner keeps its own
        # (a CPU Adam cannot be capturable), and its step count where that puts it.
        capturable = self.optimizer.defaults.get("capturable", False)
        for group in self.optimizer.param_groups:
            if "capturable" in group:
                group["capturable"] = capturable
        for state in self.optimizer.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].to(self.device if capturable else "cpu", torch.float32)
        self.version = version


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_cpu(v) for v in value]
    return value
