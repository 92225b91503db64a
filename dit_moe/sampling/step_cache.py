"""Step caching for DiT-MoE sampling: reuse the routed experts' output across adjacent model evaluations.

    --cache experts:2      recompute router + routed experts at every 2nd evaluation, reuse between

Adjacent sampler steps see nearly the same tokens (the idea behind DeepCache, FORA and TaylorSeer,
which reuse whole blocks or attention/MLP outputs). In an MoE block the routed experts are most of
the feed-forward's FLOPs, so here each MoE layer's routed output (router -> dispatch -> experts ->
combine, per token) is kept from a refresh evaluation and reused on the following ones, while
attention, adaLN, shared experts and every dense block are still computed from the current input.
A refresh happens every `every` evaluations and whenever the batch's shape changes (a guidance
interval switching between [cond, uncond] and cond-only rows).

Why not diffusers' hooks (FirstBlockCache, FasterCache, PyramidAttentionBroadcast, TaylorSeer):
they are registered by block class and argument names (`hidden_states`, `encoder_hidden_states`)
of diffusers' transformer blocks, and they cache whole blocks or attention; our blocks take
`(x, c)` and the part worth caching is one sub-module's routed path, which none of them targets.
This is a context manager that swaps each MoE layer's `forward` for the run and restores it.

Routing statistics (tokens_per_expert, a routing recorder's hooks on the router) only see the
refresh evaluations, since the router does not run on the others.

Cost at DiT-MoE-G/2 16E2A on 64 GPUs: one cached (rows, tokens, hidden) tensor per MoE layer of
the rank's batch, the size of one block's activations; no communication is added (with expert
parallelism a reuse evaluation skips the layer's two all-to-alls as well).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..models.flops import block_ffn_flops
from ..utils.errors import UserError

CACHE_KINDS = ("experts",)


@dataclass(frozen=True)
class CacheSpec:
    """What is reused across evaluations and how often it is recomputed."""

    kind: str  # "experts": each MoE layer's routed output
    every: int  # recompute at evaluations 0, every, 2 * every, ...

    @classmethod
    def parse(cls, text: Optional[str]) -> Optional["CacheSpec"]:
        """`experts:N` (N >= 2), or None / "none" for no caching; bad text raises ValueError."""
        if text is None or text == "none":
            return None
        kind, _, every = text.partition(":")
        if kind not in CACHE_KINDS or not every.isdigit() or int(every) < 2:
            raise ValueError(
                f"--cache {text} is not understood; use experts:N with N >= 2 (recompute every N evaluations) or none."
            )
        return cls(kind, int(every))


def check_cache(spec: Optional[CacheSpec], config) -> None:
    """Step caching of routed experts needs a model that has some."""
    if spec is not None and config.moe is None:
        raise UserError(
            f"--cache {spec.kind}:{spec.every} reuses routed-expert outputs but this checkpoint is a dense model "
            "without experts; leave --cache out."
        )


class ExpertCache:
    """Context manager reusing routed-expert outputs of `model`'s MoE layers (see the module docstring).

    `flops_saved` counts the matmul FLOPs skipped (router + routed experts, dit_moe.models.flops'
    accounting) over the run; `reused` counts the layer evaluations served from the cache.
    """

    def __init__(self, model: nn.Module, spec: CacheSpec):
        self.model, self.spec = model, spec
        self.layers = [block.moe for block in getattr(model, "blocks", []) if getattr(block, "is_moe", False)]
        self.evaluation = -1
        self.flops_saved = 0
        self.reused = 0
        self._handle = None

    def __enter__(self) -> "ExpertCache":
        self._handle = self.model.register_forward_pre_hook(self._count)
        for layer in self.layers:
            layer.forward = self._cached_forward(layer)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()
        for layer in self.layers:
            del layer.forward  # back to the class's forward

    def _count(self, module, args) -> None:
        self.evaluation += 1

    def _routed_flops_per_row(self, layer: nn.Module, tokens: int) -> int:
        config = self.model.config
        flops = block_ffn_flops(config.hidden_size, int(config.hidden_size * config.mlp_ratio), layer.args, tokens)
        return flops["router"] + flops["experts"]

    def _cached_forward(self, layer: nn.Module):
        plain = type(layer).forward.__get__(layer)
        state: dict[str, torch.Tensor] = {}

        def forward(x: torch.Tensor):
            refresh = self.evaluation % self.spec.every == 0 or state.get("routed", x).shape != x.shape
            if refresh or "routed" not in state:
                shared, layer.shared_experts = layer.shared_experts, None
                try:
                    routed, aux = plain(x)  # router -> dispatch -> experts -> combine only
                finally:
                    layer.shared_experts = shared
                state["routed"] = routed
            else:
                routed, aux = state["routed"], {}
                self.reused += 1
                self.flops_saved += x.shape[0] * self._routed_flops_per_row(layer, x.shape[1])
            if layer.shared_experts is None:
                return routed, aux
            return routed + layer.shared_experts(x.reshape(-1, x.shape[-1])).reshape(x.shape), aux

        return forward
