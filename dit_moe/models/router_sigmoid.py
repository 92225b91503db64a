"""Sigmoid gating with renormalised top-k and auxiliary-loss-free load balancing (Wang et al.,
"Auxiliary-Loss-Free Load Balancing Strategy for Mixture-of-Experts", 2024; DeepSeek-V3, 2024).

Notation (as in router.py):
    s_{t,e}   sigmoid affinity of expert e for token t                   -> `scores`      [M, E]
    b_e       per-expert bias, used to select only                       -> `expert_bias` [E]
    g_{t,j}   s of the j-th selected expert, renormalised over the k     -> `weights`     [M, k]
    c_e       token copies routed to e during the optimizer step (all micro-batches, all ranks)
    u         bias update rate (`MoEArgs.bias_update_rate`)

Selection: the k experts of largest s_{t,e} + b_e; weights: g_{t,j} = s_{t,e_j} / sum_j s_{t,e_j}
(for k = 1 the score itself, so the gate still gets a gradient). The bias changes which experts a
token reaches, never how much their outputs count, and it is not trained by the loss: after each
optimizer step, b_e += u * sign(mean_e c - c_e) raises under-loaded experts and lowers
over-loaded ones. The forward only counts c (a non-persistent buffer, training mode only, once
per forward under gradient checkpointing); the update happens outside it, in `update_expert_bias`,
which `register_expert_bias_update` hangs on the optimizer as a step post-hook (as torchtitan's
`build_optimizers_with_moe_load_balancing` does), with an all-reduce, so every rank sees the
global load and keeps the same bias. A step the engine skips (an fp16 overflow) never calls the
optimizer, so it updates no bias; its counts join the next step's. Gradient accumulation and ZeRO
see an ordinary forward. The bias is a persistent fp32 buffer: checkpoints, exports and resume
carry it; a file without one (e.g. a top-k or upcycled checkpoint) loads with b = 0.

Balancing loss: none unless asked (`MoEArgs.aux_loss_coef` defaults to 0 for this router);
DeepSeek-V3 adds its sequence-wise loss at 1e-4 (`--aux-loss-coef 1e-4 --aux-loss-per-sample True`).
Cost per rank (DiT-MoE-G/2 16E2A, 64 GPUs): L x E fp32 counts (a few KB) and one all-reduce of
them per optimizer step.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .router import TopKRouter


class SigmoidBiasRouter(TopKRouter):
    """Sigmoid affinities, top-k of affinity + bias, weights renormalised over the selected k."""

    state_buffers = ("expert_bias",)
    fp32_buffers = ("step_load",)

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, bias_update_rate: float = 1e-3) -> None:
        super().__init__(hidden_size, num_experts, top_k, norm_topk_prob=True)
        self.bias_update_rate = bias_update_rate
        self.register_buffer("expert_bias", torch.zeros(num_experts))
        # fp32 counts: exact up to 2^24 copies per step, and they are only compared.
        self.register_buffer("step_load", torch.zeros(num_experts), persistent=False)
        self.load_pending = False  # counts since the last update (a Python flag: no host sync)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Route x [..., C]: returns fp32 weights [M, k], int64 expert_ids [M, k], fp32 sigmoid scores [M, E]."""
        scores = self.logits(x).sigmoid()
        expert_ids = torch.topk(scores + self.expert_bias, k=self.top_k, dim=-1).indices  # [M, k]
        weights = scores.gather(1, expert_ids)  # [M, k]
        if self.top_k > 1:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if self.records_side_effects:
            with torch.no_grad():
                flat = expert_ids.reshape(-1)
                self.step_load.scatter_add_(0, flat, torch.ones_like(flat, dtype=self.step_load.dtype))
            self.load_pending = True
        return weights, expert_ids, scores

    def load_balancing_loss(self, expert_ids: Tensor, scores: Tensor, num_samples: int, per_sample: bool) -> Tensor:
        """The top-k loss on affinities normalised over the experts (DeepSeek-V3's complementary loss)."""
        normalised = scores / scores.sum(dim=-1, keepdim=True)
        return super().load_balancing_loss(expert_ids, normalised, num_samples, per_sample)

    @torch.no_grad()
    def update_bias(self, load: Tensor) -> None:
        """b += u * sign(mean(load) - load) for this step's load [E]; resets the step's count."""
        self.expert_bias.add_(torch.sign(load.mean() - load).to(self.expert_bias.dtype), alpha=self.bias_update_rate)
        self.step_load.zero_()
        self.load_pending = False


@torch.no_grad()
def update_expert_bias(model: nn.Module, all_reduce: Optional[Callable[[Tensor], object]] = None) -> bool:
    """After an optimizer step: update every sigmoid-bias router of `model` from the step's load.

    `all_reduce` sums a tensor in place across data-parallel ranks (torch.distributed.all_reduce);
    all layers' counts travel in one [L, E] tensor. Returns whether the model has such routers
    (without them nothing is communicated).
    """
    routers = sigmoid_bias_routers(model)
    if routers:
        _update(routers, all_reduce)
    return bool(routers)


def sigmoid_bias_routers(model: nn.Module) -> list[SigmoidBiasRouter]:
    return [m for m in model.modules() if isinstance(m, SigmoidBiasRouter)]


def _update(routers: list[SigmoidBiasRouter], all_reduce: Optional[Callable[[Tensor], object]]) -> None:
    loads = torch.stack([r.step_load for r in routers])  # L x [E] -> [L, E]
    if all_reduce is not None:
        all_reduce(loads)
    for router, load in zip(routers, loads):
        router.update_bias(load)


def register_expert_bias_update(
    optimizer: torch.optim.Optimizer, model: nn.Module, all_reduce: Optional[Callable[[Tensor], object]] = None
) -> Optional[RemovableHandle]:
    """Update `model`'s sigmoid-bias routers after every step of `optimizer` (a step post-hook);
    None when the model has none. The engine may call the optimizer once per parameter group in one
    step (DeepSpeed's ZeRO does): only the first call after a forward updates, on every rank alike."""
    routers = sigmoid_bias_routers(model)
    if not routers:
        return None

    def after_step(*_) -> None:
        if routers[0].load_pending:
            _update(routers, all_reduce)

    return optimizer.register_step_post_hook(after_step)
