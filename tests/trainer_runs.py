"""Run the trainer in a subprocess (DeepSpeed initialises torch.distributed once per process)."""

import json
import os
import subprocess
import sys
from pathlib import Path

from dit_moe.utils.launch import free_port

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "--model",
    "DiT-T/2",
    "--num_experts",
    "4",
    "--num_experts_per_tok",
    "2",
    "--dataset",
    "digits",
    "--image-size",
    "8",
    "--log-every",
    "1",
]


def env() -> dict:
    out = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        out.pop(key, None)
    return out


def train_cmd(results_dir, *args, zero="zero2", launcher=None, ranks=2):
    base = [
        "train_deepspeed.py",
        "--deepspeed_config",
        f"config/{zero}.json",
        *TINY,
        "--results-dir",
        str(results_dir),
        *args,
    ]
    if launcher == "deepspeed":
        return [
            sys.executable,
            "-m",
            "deepspeed.launcher.runner",
            "--num_gpus",
            str(ranks),
            "--master_port",
            str(free_port()),
            *base,
        ]
    return [sys.executable, *base]


def run_in_repo(cmd, timeout=600, **extra_env) -> subprocess.CompletedProcess:
    """`cmd` from the repository root with the trainer environment (plus `extra_env`), output captured."""
    return subprocess.run(cmd, cwd=REPO, env=dict(env(), **extra_env), capture_output=True, text=True, timeout=timeout)


def run_train(results_dir, *args, zero="zero2", launcher=None, check=True, timeout=600, ranks=2):
    proc = run_in_repo(train_cmd(results_dir, *args, zero=zero, launcher=launcher, ranks=ranks), timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"trainer failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def losses(results_dir) -> dict[int, float]:
    lines = (Path(results_dir) / "metrics.jsonl").read_text().splitlines()
    return {rec["step"]: rec["loss"] for rec in map(json.loads, lines)}


def records(results_dir) -> dict[int, dict]:
    """metrics.jsonl by step."""
    lines = (Path(results_dir) / "metrics.jsonl").read_text().splitlines()
    return {rec["step"]: rec for rec in map(json.loads, lines)}
