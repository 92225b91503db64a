"""The trainer command the benches launch: `train_deepspeed.py` on the built-in digits, on CPU processes."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def digits_cmd(ranks: int, ds_config: str, model: str, num_experts: int, image_size: int, *flags: str) -> list[str]:
    """`ranks` processes (the deepspeed launcher when more than one), top-2 routing, `flags` appended."""
    launch = ["-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), "--master_port", str(_port())]
    return [
        sys.executable,
        *(launch if ranks > 1 else []),
        "train_deepspeed.py",
        "--deepspeed_config",
        ds_config,
        "--model",
        model,
        "--num_experts",
        str(num_experts),
        "--num_experts_per_tok",
        "2",
        "--dataset",
        "digits",
        "--image-size",
        str(image_size),
        *flags,
    ]
