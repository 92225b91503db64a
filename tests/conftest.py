"""Shared test setup: CPU-only, deterministic, small thread count so parallel runs stay fast."""

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import pytest
import torch

from dit_moe.checkpoint import save_export
from dit_moe.diffusion import ObjectiveConfig

from tiny_dit import tiny_model

torch.set_num_threads(1)  # many small ops: one thread is fastest on a shared 2-core machine


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory):
    """An export (no EMA) of a random-weight tiny MoE flow model on 8x8 RGB pixels: 4 experts, top-2."""
    torch.manual_seed(0)
    model = tiny_model(in_channels=3, num_experts=4, num_experts_per_tok=2)
    return save_export(
        tmp_path_factory.mktemp("tiny") / "tiny.safetensors",
        model.config,
        model.state_dict(),
        objective=ObjectiveConfig(objective="flow"),
    )


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """The suite's shared trainer run: DiT-T/2 4E2A on 8 px digits, one CPU process, ZeRO-2, 4 steps
    at global batch 8, a checkpoint every 2 steps (read-only: tests copy it before changing it)."""
    from trainer_runs import run_train

    out = tmp_path_factory.mktemp("trained_run")
    run_train(out, "--global-batch-size", "8", "--max-steps", "4", "--ckpt-every", "2")
    return out


QUICKSTART_STEPS = 500


@pytest.fixture(scope="session")
def quickstart_run(tmp_path_factory):
    """The quickstart's recipe (config/quickstart.yaml: DiT-T/2 4E2A, rectified flow, digits) for 500 steps
    with the trainer's default EMA (decay 0.9999 with its warm-up ramp), one CPU process; shared by the
    tests that need a model that draws digits."""
    from trainer_runs import run_train

    results = tmp_path_factory.mktemp("quickstart")
    args = ["--config", "config/quickstart.yaml", "--max-steps", str(QUICKSTART_STEPS), "--ckpt-every", "1000"]
    run_train(results, *args, "--ema-decay", "0.9999", "--ema-warmup-steps", "100000", timeout=1800)
    return results
