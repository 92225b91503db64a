"""Test harness: run a script with a simulated full disk, without filling a real one (tests only; the
product has no such switch).

    python tests/full_disk.py free=BYTES train_deepspeed.py ARGS...   # every disk reports BYTES free
    python tests/full_disk.py enospc=PART train_deepspeed.py ARGS...  # optimizer-state files (DeepSpeed's or
                                                                     # the sharded resumable state's) whose
                                                                     # path holds PART fail half-written

As the deepspeed launcher's user script it passes each rank's `--local_rank=N` on to the script.
"""

import errno
import os
import runpy
import shutil
import sys
from pathlib import Path

import torch


def report_free(free: int) -> None:
    """`shutil.disk_usage` (what the trainer's check reads) reports `free` bytes free on every disk."""
    real = shutil.disk_usage

    def disk_usage(path):
        return real(path)._replace(free=free)

    shutil.disk_usage = disk_usage


def _is_optimizer_state(path: str) -> bool:
    name = os.path.basename(path)
    return "optim_states" in name or name.startswith(".state_rank")  # atomic writes go to a hidden temporary


def _failing(real, part: str):
    """`real(obj, path, ...)` that, for an optimizer-state path holding `part`, writes a few bytes and then
    fails as a full disk does."""

    def save(obj, f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)) and part in str(f) and _is_optimizer_state(str(f)):
            Path(f).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return real(obj, f, *args, **kwargs)

    return save


def fail_optimizer_write(part: str) -> None:
    """Writes of optimizer state (torch.save of DeepSpeed's files, safetensors of the resumable state) whose
    path holds `part` fail half-written."""
    import safetensors.torch

    torch.save = _failing(torch.save, part)
    safetensors.torch.save_file = _failing(safetensors.torch.save_file, part)


def main() -> None:
    local_rank = [arg for arg in sys.argv[1:] if arg.startswith("--local_rank")]
    setting, script, *args = [arg for arg in sys.argv[1:] if arg not in local_rank]
    mode, value = setting.split("=", 1)
    {"free": lambda: report_free(int(value)), "enospc": lambda: fail_optimizer_write(value)}[mode]()
    sys.argv = [script, *local_rank, *args]
    sys.path.insert(0, str(Path(script).resolve().parent))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
