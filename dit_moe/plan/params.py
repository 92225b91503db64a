"""Parameter counts of a DiT / DiT-MoE by the role DeepSpeed gives them, from a model built on the meta device.

Building the real module (torch's meta device: shapes, no storage) counts exactly what the trainer
trains, whatever flags shape it, instead of restating the architecture as a formula.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models import DiT, DiTConfig
from ..models.moe import MoEFeedForward


@dataclass(frozen=True)
class ParamCounts:
    """Element counts of one model (all experts, before any expert-parallel split)."""

    dense: int  # trainable parameters outside the routed experts (attention, shared experts, routers, ...)
    expert: int  # trainable routed-expert parameters, all experts of all MoE layers
    frozen: int  # parameters that do not train (fixed position embeddings): in the module, not in the optimizer
    largest_moe_layer: int  # routed-expert elements of one MoE layer (gathered whole under ZeRO-3)
    persistent: int  # trainable tensors ZeRO-3 keeps whole on every rank (at most its persistence threshold)

    @property
    def trainable(self) -> int:
        return self.dense + self.expert

    @property
    def total(self) -> int:
        return self.trainable + self.frozen


def count_parameters(config: DiTConfig, persistence_threshold: float = 1e5) -> ParamCounts:
    """`ParamCounts` of the model `config` describes; ZeRO-3 keeps tensors of <= `persistence_threshold` elements whole."""
    with torch.device("meta"):
        model = DiT(config)
    experts = {id(p) for m in model.modules() if isinstance(m, MoEFeedForward) for p in m.experts.parameters()}
    layers = [sum(p.numel() for p in m.experts.parameters()) for m in model.modules() if isinstance(m, MoEFeedForward)]
    trainable = [p for p in model.parameters() if p.requires_grad]
    return ParamCounts(
        dense=sum(p.numel() for p in trainable if id(p) not in experts),
        expert=sum(p.numel() for p in trainable if id(p) in experts),
        frozen=sum(p.numel() for p in model.parameters() if not p.requires_grad),
        largest_moe_layer=max(layers, default=0),
        persistent=sum(p.numel() for p in trainable if p.numel() <= persistence_threshold),
    )
