"""Test harness: run the trainer and kill it (SIGKILL, as `kill -9` does) in the middle of writing a file of
its resumable state (tests only; the product has no such switch).

    python tests/kill_mid_write.py PART train_deepspeed.py ARGS...   # the first state file whose path holds
                                                                    # PART is half-written, then the process dies
"""

import os
import runpy
import signal
import sys
from pathlib import Path

import safetensors.torch


def kill_during_write(part: str) -> None:
    real = safetensors.torch.save_file

    def save_file(tensors, filename, *args, **kwargs):
        if part in str(filename) and os.path.basename(filename).startswith(".state_rank"):
            Path(filename).write_bytes(b"partial")
            os.kill(os.getpid(), signal.SIGKILL)
        return real(tensors, filename, *args, **kwargs)

    safetensors.torch.save_file = save_file


def main() -> None:
    local_rank = [arg for arg in sys.argv[1:] if arg.startswith("--local_rank")]
    part, script, *args = [arg for arg in sys.argv[1:] if arg not in local_rank]
    kill_during_write(part)
    sys.argv = [script, *local_rank, *args]
    sys.path.insert(0, str(Path(script).resolve().parent))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
