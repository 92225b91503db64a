"""Expert parallelism: each rank of an expert-parallel group holds E / N of the routed experts.

Notation:
    N         ranks in the expert-parallel group (`ep_size`); r this rank's index in it
    E, E_l    routed experts, local experts per rank (E / N); rank r owns experts r*E_l ... (r+1)*E_l - 1
    S         rows of this rank's dispatched buffer (sorted by global expert, see `moe.dispatch`)
    R         rows this rank receives: copies, from every rank of the group, routed to its experts

Between `dispatch` and `combine` the MoE layer hands its buffer to `ExpertParallel`, which
1. exchanges the per-expert row counts (all-to-all of [E] counts -> [N, E_l]),
2. sends each rank's rows to the expert's owner (`all_to_all_single`, uneven splits),
3. regroups the received rows by local expert and runs the local experts,
4. undoes the regrouping and sends the outputs back along the same splits.
Both all-to-alls are autograd functions whose backward is the reverse exchange, so expert
gradients accumulate on the owning rank from every rank's tokens. Everything else in the model
(router, shared experts, attention) stays data-parallel.

This module uses torch.distributed only; the process groups come from the trainer.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, fields
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..models.moe import MoEFeedForward


@dataclass
class AllToAllStats:
    """Traffic to and from other ranks of the group, summed since the last `take()`.

    tokens_*: dispatched token copies (forward only); bytes_*: every all-to-all, forward and
    backward, dispatch and combine; all_to_all_s: wall time inside the all-to-alls (CUDA events on GPU).
    """

    tokens_sent: float = 0.0
    tokens_received: float = 0.0
    bytes_sent: float = 0.0
    bytes_received: float = 0.0
    all_to_all_s: float = 0.0

    def as_tensor(self) -> Tensor:
        return torch.tensor([getattr(self, f.name) for f in fields(self)], dtype=torch.float64)


class ExpertParallel:
    """Runs a layer's local experts on the token copies that every rank of `group` routes to them.

    One object serves every MoE layer of a model; it also accumulates `stats`.
    """

    def __init__(self, group: Optional[dist.ProcessGroup], num_experts: int) -> None:
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        if num_experts % self.size:
            raise ValueError(
                f"--ep-size {self.size} must divide the number of experts ({num_experts}); "
                f"choose an ep size among {[n for n in range(1, num_experts + 1) if num_experts % n == 0]}."
            )
        self.num_experts = num_experts
        self.num_local = num_experts // self.size
        self.first_expert = self.rank * self.num_local
        self.stats = AllToAllStats()
        self._pending_events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def take_stats(self) -> AllToAllStats:
        """The statistics since the last call (waits for pending CUDA timings: a host sync)."""
        for start, end in self._pending_events:
            end.synchronize()
            self.stats.all_to_all_s += start.elapsed_time(end) / 1000.0
        stats, self.stats, self._pending_events = self.stats, AllToAllStats(), []
        return stats

    def gather_experts(self, local: Tensor) -> Tensor:
        """Full [E, ...] tensor from every rank's [E_l, ...] slice (a collective over the group)."""
        parts = [torch.empty_like(local) for _ in range(self.size)]
        dist.all_gather(parts, local.contiguous(), group=self.group)
        return torch.cat(parts)

    def local_slice(self, full: Tensor) -> Tensor:
        """This rank's [E_l, ...] slice of a full [E, ...] tensor."""
        return full[self.first_expert : self.first_expert + self.num_local]

    def __call__(self, experts: nn.Module, buffer: Tensor, counts: Tensor) -> Tensor:
        """buffer [S, C] sorted by global expert, counts [E] -> expert outputs [S, C] in the same order."""
        N, E_l = self.size, self.num_local
        received = torch.empty_like(counts)
        dist.all_to_all_single(received, counts.contiguous(), group=self.group)  # [E] -> [N * E_l] by source
        received = received.view(N, E_l)  # [N * E_l] -> [N, E_l]: rows from source s for local expert j
        # Host sync: all_to_all_single needs its split sizes on the host.
        send_splits = counts.view(N, E_l).sum(dim=1).tolist()
        recv_splits = received.sum(dim=1).tolist()
        self._count_tokens(send_splits, recv_splits)

        rows = _AllToAll.apply(buffer, recv_splits, send_splits, self)  # [R, C], source-major
        order = _expert_major_order(received)
        local_out = experts(rows.index_select(0, order), received.sum(dim=0))  # [R, C], expert-major
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        back = local_out.index_select(0, inverse)  # expert-major -> source-major
        return _AllToAll.apply(back, send_splits, recv_splits, self)  # [S, C]

    def _count_tokens(self, send_splits: list[int], recv_splits: list[int]) -> None:
        self.stats.tokens_sent += sum(send_splits) - send_splits[self.rank]
        self.stats.tokens_received += sum(recv_splits) - recv_splits[self.rank]

    def exchange(self, x: Tensor, out_splits: list[int], in_splits: list[int]) -> Tensor:
        """all_to_all_single of rows of x: `in_splits[d]` rows go to rank d, `out_splits[s]` come from s."""
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        row_bytes = math.prod(x.shape[1:]) * x.element_size()
        self.stats.bytes_sent += (sum(in_splits) - in_splits[self.rank]) * row_bytes
        self.stats.bytes_received += (sum(out_splits) - out_splits[self.rank]) * row_bytes
        if x.is_cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=self.group)
            end.record()
            self._pending_events.append((start, end))
        else:
            began = time.perf_counter()
            dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=self.group)
            self.stats.all_to_all_s += time.perf_counter() - began
        return out


class _AllToAll(torch.autograd.Function):
    """Differentiable uneven all-to-all: the backward sends gradients back along the reversed splits."""

    @staticmethod
    def forward(ctx, x: Tensor, out_splits: list[int], in_splits: list[int], ep: ExpertParallel) -> Tensor:
        ctx.splits, ctx.ep = (out_splits, in_splits), ep
        return ep.exchange(x, out_splits, in_splits)

    @staticmethod
    def backward(ctx, grad: Tensor):
        out_splits, in_splits = ctx.splits
        return ctx.ep.exchange(grad, in_splits, out_splits), None, None, None


def _expert_major_order(received: Tensor) -> Tensor:
    """Permutation [R] that regroups received rows (source-major, [N, E_l] counts) by local expert."""
    N, E_l = received.shape
    segments = torch.arange(N * E_l, device=received.device)  # segment s * E_l + j: source s, expert j
    segment_of_row = torch.repeat_interleave(segments, received.reshape(-1))  # [R]
    key = (segment_of_row % E_l) * N + segment_of_row // E_l  # expert-major, then source
    return torch.argsort(key, stable=True)


def shard_experts(model: nn.Module, ep: ExpertParallel) -> list[nn.Parameter]:
    """Keep only this rank's experts in every MoE layer of `model` and route through `ep`.

    Returns the local expert parameters (for the trainer to mark as expert-parallel).
    """
    params: list[nn.Parameter] = []
    for module in model.modules():
        if isinstance(module, MoEFeedForward):
            if module.args.num_experts != ep.num_experts:
                raise ValueError(f"Every MoE layer needs {ep.num_experts} experts for this expert-parallel setup.")
            module.experts.keep_experts(ep.first_expert, ep.num_local)
            module.expert_parallel = ep
            params.extend(module.experts.parameters())
    return params
