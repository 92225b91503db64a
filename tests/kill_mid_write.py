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

import dit_moe.utils.safetensors_stream as stream


def kill_during_write(part: str) -> None:
    """Patch the streamed writer (before the trainer imports it) to die after the first tensor of the file."""
    real = stream.write_streamed

    def write_streamed(path, specs, tensors, metadata=None):
        if part in str(path) and os.path.basename(path).startswith(".state_rank"):

            def dying():
                for index, item in enumerate(tensors):
                    if index == 1:  # the first tensor is on disk, the rest never will be
                        os.kill(os.getpid(), signal.SIGKILL)
                    yield item

            return real(path, specs, dying(), metadata)
        return real(path, specs, tensors, metadata)

    stream.write_streamed = write_streamed


def main() -> None:
    local_rank = [arg for arg in sys.argv[1:] if arg.startswith("--local_rank")]
    part, script, *args = [arg for arg in sys.argv[1:] if arg not in local_rank]
    kill_during_write(part)
    sys.argv = [script, *local_rank, *args]
    sys.path.insert(0, str(Path(script).resolve().parent))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
