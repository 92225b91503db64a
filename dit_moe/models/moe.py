"""The MoE feed-forward layer of a DiT-MoE block: route -> dispatch -> experts -> combine -> + shared.

Notation:
    N, T, C   samples, tokens (patches) per sample, hidden width;  M = N * T tokens
    E, k      routed experts, experts per token
    S         rows of the dispatched buffer: M * k copies (dropless), fewer when a
              capacity drops some

`dispatch` and `combine` are inverse functions that pass a `DispatchMeta`; expert
parallelism puts its all-to-all between them and runs `experts` on its local slice.
Training and evaluation run the same (dropless) path and give the same output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from .config import MoEArgs
from .experts import GroupedExperts, SwiGLUMLP
from .router import TopKRouter


@dataclass
class DispatchMeta:
    """How the dispatched buffer maps back to tokens.

    token_indices [S]: token (row of the [M, C] input) of each buffer row.
    copy_indices  [S]: index into the flattened [M * k] routing slots (weights) of each row.
    counts        [E]: buffer rows per expert, in expert order (int64, on device).
    routed_counts [E]: token copies routed to each expert, before any capacity drop.
    num_tokens:        M.
    """

    token_indices: Tensor
    copy_indices: Tensor
    counts: Tensor
    routed_counts: Tensor
    num_tokens: int


def dispatch(
    x: Tensor, expert_ids: Tensor, num_experts: int, capacity: Optional[int] = None
) -> tuple[Tensor, DispatchMeta]:
    """Gather token copies into one buffer sorted by expert.

    x [M, C], expert_ids [M, k] -> buffer [S, C] and the metadata `combine` needs.
    The sort is stable, so within an expert copies keep token order; with a `capacity`,
    each expert keeps its first `capacity` copies and drops the rest.
    """
    k = expert_ids.shape[1]
    flat_ids = expert_ids.reshape(-1)  # [M, k] -> [M * k]
    copy_indices = torch.argsort(flat_ids, stable=True)  # [M * k]
    # scatter_add rather than bincount: bincount's output size would need a host sync.
    routed = torch.zeros(num_experts, dtype=torch.int64, device=x.device)
    routed.scatter_add_(0, flat_ids, torch.ones_like(flat_ids))
    counts = routed
    if capacity is not None:
        starts = torch.cumsum(routed, dim=0) - routed  # [E], first buffer row of each expert
        sorted_ids = flat_ids.index_select(0, copy_indices)
        position = torch.arange(sorted_ids.shape[0], device=x.device) - starts.index_select(0, sorted_ids)
        copy_indices = copy_indices[position < capacity]  # boolean indexing: a host sync, capacity mode only
        counts = routed.clamp(max=capacity)
    token_indices = torch.div(copy_indices, k, rounding_mode="floor")
    buffer = x.index_select(0, token_indices)  # [S, C]
    return buffer, DispatchMeta(token_indices, copy_indices, counts, routed, x.shape[0])


def combine(expert_out: Tensor, weights: Tensor, meta: DispatchMeta) -> Tensor:
    """Inverse of `dispatch`: weight each row by its routing weight and sum the copies of a token.

    expert_out [S, C], weights [M, k] -> [M, C]; dropped copies contribute 0.
    """
    row_weights = weights.reshape(-1).index_select(0, meta.copy_indices).to(expert_out.dtype)  # [M * k] -> [S]
    out = expert_out.new_zeros(meta.num_tokens, expert_out.shape[1])
    return out.index_add_(0, meta.token_indices, expert_out * row_weights.unsqueeze(1))


class MoEFeedForward(nn.Module):
    """DiT-MoE's `SparseMoeBlock`: top-k routed experts plus (optionally) one shared SwiGLU expert.

    Parameter names follow feizc/DiT-MoE (`gate.weight`, `experts.*`, `shared_experts.*`);
    its per-expert `experts.K.*` keys load through the experts' pre-hook.
    forward(x [N, T, C]) -> (y [N, T, C], aux losses already multiplied by their coefficients:
    "moe_aux_loss" and "moe_z_loss", present only in training mode with a coefficient > 0).
    `tokens_per_expert` [E] holds the routed token copies per expert of the last forward.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, args: MoEArgs) -> None:
        super().__init__()
        self.args = args
        self.gate = TopKRouter(hidden_size, args.num_experts, args.num_experts_per_tok, args.norm_topk_prob)
        self.experts = GroupedExperts(
            args.num_experts, hidden_size, intermediate_size, args.expert_type, args.grouped_gemm
        )
        if args.n_shared_experts > 0:
            self.shared_experts = SwiGLUMLP(hidden_size, args.n_shared_experts * hidden_size)
        else:
            self.shared_experts = None
        # Set by expert parallelism (`dit_moe.parallel`): runs this layer's local experts on the
        # copies every rank routes to them. None: all experts are here.
        self.expert_parallel = None
        # int64 so that casting the model to half precision cannot round the counts.
        self.register_buffer("tokens_per_expert", torch.zeros(args.num_experts, dtype=torch.int64), persistent=False)

    def capacity(self, num_tokens: int) -> Optional[int]:
        """Buffer rows per expert, ceil(cf * k * M / E), or None when dropless."""
        cf = self.args.capacity_factor
        if cf is None:
            return None
        return math.ceil(cf * self.args.num_experts_per_tok * num_tokens / self.args.num_experts)

    def forward(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        N, T, C = x.shape
        tokens = x.reshape(N * T, C)  # [N, T, C] -> [M, C]
        weights, expert_ids, scores = self.gate(x)
        buffer, meta = dispatch(tokens, expert_ids, self.args.num_experts, self.capacity(N * T))
        with torch.no_grad():
            self.tokens_per_expert.copy_(meta.routed_counts)
        if self.expert_parallel is None:
            expert_out = self.experts(buffer, meta.counts)
        else:
            expert_out = self.expert_parallel(self.experts, buffer, meta.counts)
        y = combine(expert_out, weights, meta).to(x.dtype)
        if self.shared_experts is not None:
            y = y + self.shared_experts(tokens)
        return y.reshape(N, T, C), self.aux_losses(x, expert_ids, scores)  # [M, C] -> [N, T, C]

    def aux_losses(self, x: Tensor, expert_ids: Tensor, scores: Tensor) -> dict[str, Tensor]:
        """The weighted router losses of this forward (empty in eval mode or with zero coefficients)."""
        losses: dict[str, Tensor] = {}
        if not self.training:
            return losses
        if self.args.aux_loss_coef > 0:
            balance = self.gate.load_balancing_loss(expert_ids, scores, x.shape[0], self.args.aux_loss_per_sample)
            losses["moe_aux_loss"] = balance * self.args.aux_loss_coef
        if self.args.z_loss_coef > 0:
            losses["moe_z_loss"] = self.gate.z_loss(x) * self.args.z_loss_coef
        return losses


def moe_load_stats(model: nn.Module) -> dict[str, dict[str, Tensor]]:
    """Per MoE layer (by module name): `tokens_per_expert` [E] of the last forward and its
    coefficient of variation `cv` (std / mean; 0 is perfectly balanced). Tensors stay on device."""
    stats = {}
    for name, module in model.named_modules():
        if isinstance(module, MoEFeedForward):
            counts = module.tokens_per_expert.float()
            cv = counts.std(unbiased=False) / counts.mean().clamp_min(1e-9)
            stats[name] = {"tokens_per_expert": counts, "cv": cv}
    return stats
