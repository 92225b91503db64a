"""The data-parallel pieces of the loop that are plain torch.distributed: which samples of a
global micro-batch a rank holds, gathering them back, and agreeing on a stop request (preemption);
and the launch's housekeeping on a node: one error line per run, stale /dev/shm buffers removed."""

from __future__ import annotations

import logging
import os
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch
import torch.distributed as dist

from ..utils.launch import LaunchEnv

log = logging.getLogger("dit_moe.train")
SHM_DIR = Path("/dev/shm")
SHM_BUFFER_PREFIX = "deepspeed_allreduce_buffer_"  # + uid, MASTER_ADDR, MASTER_PORT, rank (DeepSpeed's shm.cpp)
STALE_AFTER_S = 60  # a buffer younger than this may belong to a run still starting up: never removed
ERROR_MARK_PREFIX = "dit_moe_error_"  # + uid, launcher pid, MASTER_PORT: "a rank of this launch has spoken"


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


def first_to_report() -> bool:
    """True for the one rank of this launch on this node that prints the run's error line: the first to
    fail (it creates a mark file named by the launcher's pid and port); the others exit quietly with the
    same code. A single process always reports. Ranks on other nodes have their own mark (one line a node)."""
    launch = LaunchEnv.from_environ()
    if launch.world_size == 1:
        return True
    name = f"{ERROR_MARK_PREFIX}{os.getuid()}_{os.getppid()}_{os.environ.get('MASTER_PORT', '')}"
    try:
        os.close(os.open(Path(tempfile.gettempdir(), name), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        return False
    return True


def _paths_in_use() -> set[str]:
    """Every file that a process this user can see maps (/proc/PID/maps) or holds open (/proc/PID/fd)."""
    used = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for line in (proc / "maps").read_text().splitlines():
                parts = line.split(None, 5)
                if len(parts) == 6:
                    used.add(parts[5].removesuffix(" (deleted)"))
            used.update(os.readlink(fd) for fd in (proc / "fd").iterdir())
        except OSError:  # another user's process, or one that just exited
            continue
    return used


def remove_stale_run_files(shm_dir: Path = SHM_DIR) -> list[Path]:
    """Remove this user's DeepSpeed CPU all-reduce buffers (~69 MB per rank) that no process maps or holds
    open and that are older than `STALE_AFTER_S` (left by killed runs: the trainer's own unlink never runs
    on SIGKILL), and error marks of launchers that are gone. Returns the buffers removed.

    Cost, once per node at start-up (local rank 0): one read of /proc/PID/maps and fd of each of this
    user's processes, only when such buffers exist; nothing on GPU runs, which create none."""
    uid = os.getuid()
    for mark in Path(tempfile.gettempdir()).glob(f"{ERROR_MARK_PREFIX}{uid}_*"):
        launcher_pid = mark.name.removeprefix(f"{ERROR_MARK_PREFIX}{uid}_").split("_")[0]
        if launcher_pid.isdigit() and not psutil.pid_exists(int(launcher_pid)):
            mark.unlink(missing_ok=True)
    buffers = sorted(shm_dir.glob(f"{SHM_BUFFER_PREFIX}{uid}_*"))
    if not buffers:
        return []
    in_use, now, removed = _paths_in_use(), time.time(), []
    for path in buffers:
        try:
            old = now - path.stat().st_mtime >= STALE_AFTER_S
        except FileNotFoundError:
            continue
        if old and str(path) not in in_use:
            path.unlink(missing_ok=True)
            removed.append(path)
    if removed:
        log.warning("Removed %d /dev/shm buffer(s) that killed DeepSpeed CPU runs left behind.", len(removed))
    return removed
