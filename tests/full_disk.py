"""Test harness: run a script with a simulated full disk, without filling a real one (tests only; the
product has no such switch).

    python tests/full_disk.py free=BYTES train_deepspeed.py ARGS...   # every disk reports BYTES free
    python tests/full_disk.py enospc=TAG train_deepspeed.py ARGS...   # DeepSpeed's optimizer file of
                                                                     # checkpoint TAG fails half-written
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


def fail_optimizer_write(tag: str) -> None:
    """`torch.save` of an optimizer file under `tag` writes a few bytes, then fails as a full disk does."""
    real = torch.save

    def save(obj, f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)) and tag in str(f) and "optim_states" in os.path.basename(f):
            Path(f).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return real(obj, f, *args, **kwargs)

    torch.save = save


def main() -> None:
    mode, value = sys.argv[1].split("=", 1)
    {"free": lambda: report_free(int(value)), "enospc": lambda: fail_optimizer_write(value)}[mode]()
    script = sys.argv[2]
    sys.argv = sys.argv[2:]
    sys.path.insert(0, str(Path(script).resolve().parent))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
