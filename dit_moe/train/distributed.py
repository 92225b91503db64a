"""The data-parallel pieces of the loop that are plain torch.distributed: which samples of a
global micro-batch a rank holds, gathering them back, and agreeing on a stop request."""

from __future__ import annotations

import logging
import signal
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger("dit_moe.train")


@dataclass(frozen=True)
class RankSlice:
    """Rank r's samples of each global micro-batch: positions r, r + W, r + 2W, ...

    The data loader deals samples in this order, and the objective's draws are sliced the same
    way (`positions`), so a sample gets the same noise and timestep for any world size W.
    """

    rank: int
    world_size: int

    @property
    def positions(self) -> slice:
        return slice(self.rank, None, self.world_size)

    def gather(self, local: torch.Tensor) -> torch.Tensor:
        """Every rank's slice of a (n,) tensor back in global-batch order (a collective when W > 1)."""
        if self.world_size == 1:
            return local
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(parts, local.contiguous())
        return torch.stack(parts, dim=1).reshape(-1)  # [n, W] -> global order r + W * i


class StopRequest:
    """SIGTERM/SIGINT (preemption) sets a flag; ranks agree on it at step boundaries."""

    def __init__(self) -> None:
        self.requested = False
        self._group = dist.new_group(backend="gloo")
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, _frame) -> None:
        self.requested = True
        log.warning("Received signal %d: will checkpoint and stop after this step.", signum)

    def agreed(self) -> bool:
        """True on every rank when any rank was signalled (a CPU all-reduce: no device sync)."""
        flag = torch.tensor([int(self.requested)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        return bool(flag.item())
