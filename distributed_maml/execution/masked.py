"""The learner's update with its finiteness check on the learner's device, nothing read back
(`MaskedUpdate`): the fused in-process step (devicesteps) and the collective loop's unlogged
steps (collectivesteps) both update through it."""

from __future__ import annotations

import torch
from torch import Tensor

from distributed_maml.core.learner import Learner


class MaskedUpdate:
    """The learner's update with the finiteness check on its device, nothing read back: a step
    whose mean meta-gradient or loss is not finite (and, with `stop`, every step after one) leaves
    the weights and the optimizer's state as they were (torch.where against a copy taken before
    the update). The same optimizer step as Learner.apply where it applies, so the same bits.
    The fused in-process step and the collective loop's unlogged steps update through it."""

    def __init__(self, learner: Learner, stop: bool) -> None:
        self.learner, self.stop = learner, stop
        _init_state(learner)
        self.state = [learner.flat, *_state_tensors(learner)]
        self.saved = [t.detach().clone() for t in self.state]
        self.halted = torch.zeros((), dtype=torch.bool, device=learner.device)  # a bad step seen under "stop"
        self.grad = torch.zeros_like(learner.flat)  # a fixed buffer (a CUDA graph's address must live on:
        # the learner's own .grad is reset by a logged step's update)

    def apply(self, mean: Tensor, loss: Tensor) -> Tensor:
        """One update with the step's mean meta-gradient and mean loss; returns whether the step
        was finite (a device bool). Applied only where it was, and nothing is halted."""
        learner = self.learner
        with torch.no_grad():
            for s, t in zip(self.saved, self.state, strict=True):
                s.copy_(t)
            finite = torch.isfinite(mean).all() & torch.isfinite(loss)
            self.grad.copy_(mean)
            learner.flat.grad = self.grad
            learner.optimizer.step()
            keep = finite & ~self.halted
            for s, t in zip(self.saved, self.state, strict=True):
                t.copy_(torch.where(keep, t, s))
            if self.stop:
                self.halted |= ~finite
        learner.flat.grad = None  # as Learner.apply leaves it
        return finite


def _init_state(learner: Learner) -> None:
    """Adam's state made now (zeros, step 0: what its first step would make), so the graph
    captures the tensors every later step updates."""
    opt = learner.optimizer
    if isinstance(opt, torch.optim.Adam) and not opt.state[learner.flat]:
        capturable = opt.defaults.get("capturable", False)
        opt.state[learner.flat] = {
            "step": torch.zeros((), dtype=torch.float32, device=learner.device if capturable else "cpu"),
            "exp_avg": torch.zeros_like(learner.flat, memory_format=torch.preserve_format),
            "exp_avg_sq": torch.zeros_like(learner.flat, memory_format=torch.preserve_format),
        }


def _state_tensors(learner: Learner) -> list[Tensor]:
    state = learner.optimizer.state.get(learner.flat, {})
    return [state[k] for k in ("step", "exp_avg", "exp_avg_sq") if isinstance(state.get(k), Tensor)]
