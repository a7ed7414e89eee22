"""The one builder of "what computes a shard": the network for a store, its parameter layout,
its pure forward function and the parameters the inner loop adapts.

Training's learner, every worker's shard computer, evaluation and `bench` all assemble their
network here, so a change to how a model is built, laid out or adapted has one place to go.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from distributed_maml.config import MamlConfig, ModelConfig
from distributed_maml.core import heads
from distributed_maml.core.maml import meta_spec, with_learned_lrs
from distributed_maml.core.models import Forward, ParamSpec, build, functional
from distributed_maml.data.format import StoreInfo


@dataclass(frozen=True)
class Network:
    """A network assembled for one store and one MAML configuration.

    `model` is the module (its own parameters are the initialisation drawn from the seed, and a
    template for `forward`); `spec` lays out the meta-parameters: the network's, then any learned
    inner step sizes (Meta-SGD, MAML++'s LSLR); `head` names what ANIL adapts (None: all);
    `task_head` says where a task's classifier rows start (maml.head; `forward` carries it)."""

    model: nn.Module
    network_spec: ParamSpec
    spec: ParamSpec
    forward: Forward
    head: frozenset[str] | None
    maml: MamlConfig
    task_head: heads.Head

    def initial(self) -> torch.Tensor:
        """The meta-parameters at the start of a run, flat: the model's initialisation, and
        every learned step size at maml.inner_lr."""
        own = self.task_head.meta_params(dict(self.model.named_parameters()))
        params = with_learned_lrs(self.maml, own, self.maml.inner_lr)
        return self.spec.flatten(params)

    def weights(self) -> dict[str, torch.Tensor]:
        """The model's initial parameters (detached), by name."""
        return {k: v.detach() for k, v in self.model.named_parameters()}


def assemble(
    model_cfg: ModelConfig, maml_cfg: MamlConfig, info: StoreInfo, seed: int = 0, device: str | torch.device = "cpu"
) -> Network:
    """The network for `info`'s tasks, initialised from `seed`, on `device`. A wrong ANIL head
    is a one-line ConfigError here (before any worker starts)."""
    model = build(model_cfg, info, seed=seed).to(device)
    network = ParamSpec.of(model)
    task_head = heads.of(maml_cfg.head, model, info.kind)
    forward = heads.attach(functional(model), task_head, model)
    heads.check_ends_in_head(task_head, forward, dict(model.named_parameters()), tuple(info.example_shape))
    return Network(
        model=model,
        network_spec=network,
        spec=meta_spec(maml_cfg, task_head.meta_spec(network)),
        forward=forward,
        head=heads.anil_head(maml_cfg, forward, network.names),
        maml=maml_cfg,
        task_head=task_head,
    )
