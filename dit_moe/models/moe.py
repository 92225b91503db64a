"""The MoE feed-forward layer of a DiT-MoE block: route -> dispatch -> experts -> combine -> + shared.

Notation:
    N, T, C   samples, tokens (patches) per sample, hidden width;  M = N * T tokens
    E, k      routed experts, experts per token (expert choice: on average)
    I         routed expert width, mlp_ratio * C * expert_width_ratio
    S         rows of the dispatched buffer: M * k copies (dropless), fewer when a
              capacity drops some; expert choice: the copies its experts took

`dispatch` and `combine` are inverse functions that pass a `DispatchMeta`; expert
parallelism puts its all-to-all between them and runs `experts` on its local slice.
The router (`MoEArgs.router`) is one of `ROUTERS`; each returns `(weights, expert_ids, scores)`,
with an empty slot (id E) wherever a router chooses fewer experts than it has slots.
Token-choice training and evaluation run the same (dropless) path and give the same output;
expert choice selects over the batch in training and by a calibrated threshold in eval mode
(router_expert_choice.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from .config import MoEArgs
from .experts import GroupedExperts, SwiGLUMLP
from .router import LinearGate, TopKRouter
from .router_expert_choice import ExpertChoiceRouter
from .router_sigmoid import SigmoidBiasRouter


def build_router(hidden_size: int, args: MoEArgs) -> LinearGate:
    """The `args.router` router of one MoE layer."""
    E, k = args.num_experts, args.num_experts_per_tok
    if args.router == "expert-choice":
        return ExpertChoiceRouter(hidden_size, E, k, args.capacity_factor)
    if args.router == "sigmoid-bias":
        return SigmoidBiasRouter(hidden_size, E, k, args.bias_update_rate)
    return TopKRouter(hidden_size, E, k, args.norm_topk_prob)


def expert_widths(hidden_size: int, intermediate_size: int, args: MoEArgs) -> tuple[int, int]:
    """(routed expert width, shared SwiGLU width; 0: no shared experts) of a layer whose dense MLP is
    `intermediate_size` wide: DiT-MoE's shared width is `n_shared_experts * hidden`, DeepSeek-MoE's
    `num_shared_experts` routed-expert widths."""
    routed = max(1, int(intermediate_size * args.expert_width_ratio))
    if args.num_shared_experts is not None:
        return routed, args.num_shared_experts * routed
    return routed, args.n_shared_experts * hidden_size


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
    x: Tensor,
    expert_ids: Tensor,
    num_experts: int,
    capacity: Optional[int] = None,
    empty_slots: bool = False,
) -> tuple[Tensor, DispatchMeta]:
    """Gather token copies into one buffer sorted by expert.

    x [M, C], expert_ids [M, k] -> buffer [S, C] and the metadata `combine` needs.
    The sort is stable, so within an expert copies keep token order; with a `capacity`,
    each expert keeps its first `capacity` copies and drops the rest. With `empty_slots`,
    ids equal to `num_experts` mark slots routed nowhere, which are dropped.
    """
    k = expert_ids.shape[1]
    flat_ids = expert_ids.reshape(-1)  # [M, k] -> [M * k]
    copy_indices = torch.argsort(flat_ids, stable=True)  # [M * k]; empty slots (id E) sort last
    # scatter_add rather than bincount: bincount's output size would need a host sync.
    routed = torch.zeros(num_experts + int(empty_slots), dtype=torch.int64, device=x.device)
    routed.scatter_add_(0, flat_ids, torch.ones_like(flat_ids))
    routed = routed[:num_experts]  # [E (+1)] -> [E]
    counts = routed
    if capacity is not None or empty_slots:
        sorted_ids = flat_ids.index_select(0, copy_indices)
        keep = sorted_ids < num_experts
        if capacity is not None:
            starts = torch.cumsum(routed, dim=0) - routed  # [E], first buffer row of each expert
            position = torch.arange(sorted_ids.shape[0], device=x.device) - starts.index_select(
                0, sorted_ids.clamp(max=num_experts - 1)
            )
            keep &= position < capacity
            counts = routed.clamp(max=capacity)
        copy_indices = copy_indices[keep]  # boolean indexing: a host sync, capacity or empty slots only
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
    """DiT-MoE's `SparseMoeBlock`: routed experts plus (optionally) shared SwiGLU experts.

    Parameter names follow feizc/DiT-MoE (`gate.weight`, `experts.*`, `shared_experts.*`);
    its per-expert `experts.K.*` keys load through the experts' pre-hook. `intermediate_size`
    is the dense MLP's width; routed experts are `expert_width_ratio` times as wide. The shared
    experts are one SwiGLU: of width `n_shared_experts * hidden` (DiT-MoE), or with
    `num_shared_experts` set, that many routed-expert widths (DeepSeek-MoE; a sum of SwiGLU
    experts is one SwiGLU of their concatenated width).
    forward(x [N, T, C]) -> (y [N, T, C], aux losses already multiplied by their coefficients:
    "moe_aux_loss" and "moe_z_loss", present only in training mode with a coefficient > 0).
    `tokens_per_expert` [E] holds the routed token copies per expert of the last forward, over
    `routed_tokens` tokens (M); `processed_copies` (a 0-d tensor) the copies the experts computed,
    fewer than routed where a capacity dropped some.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, args: MoEArgs) -> None:
        super().__init__()
        self.args = args
        self.gate = build_router(hidden_size, args)
        expert_width, shared_width = expert_widths(hidden_size, intermediate_size, args)
        self.experts = GroupedExperts(args.num_experts, hidden_size, expert_width, args.expert_type, args.grouped_gemm)
        self.shared_experts = SwiGLUMLP(hidden_size, shared_width) if shared_width > 0 else None
        # Set by expert parallelism (`dit_moe.parallel`): runs this layer's local experts on the
        # copies every rank routes to them. None: all experts are here.
        self.expert_parallel = None
        # int64 so that casting the model to half precision cannot round the counts.
        self.register_buffer("tokens_per_expert", torch.zeros(args.num_experts, dtype=torch.int64), persistent=False)
        self.routed_tokens = 0
        self.processed_copies: Optional[Tensor] = None

    def capacity(self, num_tokens: int) -> Optional[int]:
        """Buffer rows per expert, ceil(cf * k * M / E), or None when dropless (and for expert
        choice, whose router applies its capacity itself)."""
        cf = self.args.capacity_factor
        if cf is None or self.gate.empty_slots:
            return None
        return math.ceil(cf * self.args.num_experts_per_tok * num_tokens / self.args.num_experts)

    def forward(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        N, T, C = x.shape
        tokens = x.reshape(N * T, C)  # [N, T, C] -> [M, C]
        weights, expert_ids, scores = self.gate(x)
        buffer, meta = dispatch(
            tokens, expert_ids, self.args.num_experts, self.capacity(N * T), empty_slots=self.gate.empty_slots
        )
        with torch.no_grad():
            self.tokens_per_expert.copy_(meta.routed_counts)
        self.routed_tokens = N * T
        self.processed_copies = meta.counts.detach().sum()
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
        if self.args.aux_loss_coef > 0 and self.gate.has_balancing_loss:
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


class ExpertsPerTokenMeter:
    """Expert copies per token each MoE layer of `model` computed over the forwards run inside
    `with meter:` (forward hooks, removed on exit; counts summed on device, no host sync until
    `per_layer`). Token choice gives k (dropless) or what its capacity kept; expert choice at
    sampling what its thresholds let through; `dit_moe.models.flops` turns either into FLOPs."""

    def __init__(self, model: nn.Module) -> None:
        self.layers = [m for m in model.modules() if isinstance(m, MoEFeedForward)]
        self.copies: list[Optional[Tensor]] = [None] * len(self.layers)
        self.tokens = [0] * len(self.layers)
        self._handles: list = []

    def __enter__(self) -> "ExpertsPerTokenMeter":
        for index, layer in enumerate(self.layers):
            self._handles.append(layer.register_forward_hook(self._counter(index)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _counter(self, index: int):
        def hook(layer: MoEFeedForward, inputs, output) -> None:
            copies = layer.processed_copies
            self.copies[index] = copies if self.copies[index] is None else self.copies[index] + copies
            self.tokens[index] += layer.routed_tokens

        return hook

    def per_layer(self) -> list[float]:
        """Copies per token of every MoE layer, in block order (a host sync)."""
        return [0.0 if c is None else c.item() / max(1, t) for c, t in zip(self.copies, self.tokens)]

    def mean(self) -> float:
        values = self.per_layer()
        return sum(values) / max(1, len(values))
