"""Test harness: run a script with a simulated full disk, without filling a real one (tests only; the
product has no such switch).

    python tests/full_disk.py free=BYTES train_deepspeed.py ARGS...   # every disk reports BYTES free
    python tests/full_disk.py enospc=PART train_deepspeed.py ARGS...  # every file written by torch.save or
                                                                     # safetensors' save_file whose path
                                                                     # holds PART fails half-written

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


def fail_writes(part: str) -> None:
    """`torch.save`, safetensors' `save_file` and the streamed writer (EMA, state) of a file whose path holds `part`
    write a few bytes, then fail as a full disk does: ENOSPC from torch.save and the stream, safetensors' own
    SafetensorError ("os error 28")."""
    import safetensors.torch
    from safetensors import SafetensorError

    import dit_moe.utils.safetensors_stream as stream  # patched before the trainer imports its name

    real_save, real_save_file = torch.save, safetensors.torch.save_file

    def hit(f) -> bool:
        if isinstance(f, (str, os.PathLike)) and part in str(f):
            Path(f).write_bytes(b"partial")
            return True
        return False

    def save(obj, f, *args, **kwargs):
        if hit(f):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return real_save(obj, f, *args, **kwargs)

    def save_file(tensors, filename, *args, **kwargs):
        if hit(filename):
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real_save_file(tensors, filename, *args, **kwargs)

    real_streamed = stream.write_streamed

    def write_streamed(path, specs, tensors, metadata=None):
        if hit(path):
            for _ in tensors:  # every rank joins the gathers, as the real writer does after a failure
                pass
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_streamed(path, specs, tensors, metadata)

    torch.save, safetensors.torch.save_file, stream.write_streamed = save, save_file, write_streamed


def main() -> None:
    local_rank = [arg for arg in sys.argv[1:] if arg.startswith("--local_rank")]
    setting, script, *args = [arg for arg in sys.argv[1:] if arg not in local_rank]
    mode, value = setting.split("=", 1)
    {"free": lambda: report_free(int(value)), "enospc": lambda: fail_writes(value)}[mode]()
    sys.argv = [script, *local_rank, *args]
    sys.path.insert(0, str(Path(script).resolve().parent))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
