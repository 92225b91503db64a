"""The data-parallel pieces of the loop that are plain torch.distributed: which samples of a
global micro-batch a rank holds, gathering them back, and agreeing on a stop request (preemption)."""

from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass

import psutil
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


def _is_deepspeed_launcher(cmdline: list[str]) -> bool:
    """`deepspeed` (deepspeed.launcher.runner) or the per-node `python -m deepspeed.launcher.launch`."""
    return any(arg.startswith("deepspeed.launcher") or os.path.basename(arg) == "deepspeed" for arg in cmdline[:4])


def launcher_processes() -> list[psutil.Process]:
    """This rank's DeepSpeed launcher processes: the nearest ancestors that are `deepspeed` or its
    per-node launcher, nearest first (none under torchrun, srun or a plain `python`)."""
    found = []
    for parent in psutil.Process().parents():
        try:
            if not _is_deepspeed_launcher(parent.cmdline()):
                break
        except psutil.Error:
            break
        found.append(parent)
    return found


def _alive(proc: psutil.Process) -> bool:
    """Running, and not a zombie (exited, not yet reaped by its parent)."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class StopRequest:
    """Preemption: a stop flag that ranks agree on at step boundaries (then they checkpoint and stop).

    Set by SIGTERM/SIGINT to the rank, and by the exit of a DeepSpeed launcher process above it.
    The second is how a SIGTERM to `deepspeed` itself reaches the ranks: the launcher does not pass
    it on when it runs on one node (it has no handler there and just exits), and its per-node launcher
    (`deepspeed.launcher.launch`), when signalled, SIGTERMs the ranks itself and SIGKILLs them 30 s later.
    """

    def __init__(self) -> None:
        self.requested = False
        self._group = dist.new_group(backend="gloo")
        self._launchers = launcher_processes()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, _frame) -> None:
        self.requested = True
        log.warning("Received signal %d: will checkpoint and stop after this step.", signum)

    def _launcher_exited(self) -> bool:
        gone = [proc.pid for proc in self._launchers if not _alive(proc)]
        if gone:
            log.warning("The DeepSpeed launcher (pid %s) has exited: will checkpoint and stop after this step.", gone)
            self._launchers = []
        return bool(gone)

    def agreed(self) -> bool:
        """True on every rank when any rank was signalled or lost its launcher (a CPU all-reduce: no device sync)."""
        self.requested = self._launcher_exited() or self.requested
        flag = torch.tensor([int(self.requested)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        return bool(flag.item())
