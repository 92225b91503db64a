"""The bf16 ZeRO configs reduce and accumulate gradients in fp32, and the engine gets both settings."""

import json
import subprocess
import sys

import pytest

from trainer_runs import REPO, env

BF16_CONFIGS = ("zero2", "zero3", "zero3_offload")

# One process builds an engine from each config at --precision bf16 and prints what the engine and its
# ZeRO optimizer use for the gradient reduction and accumulation. The offload config is built without its
# optimizer offload: that would JIT-compile DeepSpeed's CPU Adam (minutes on a fresh CI machine) and has
# no say in either setting, which come from the JSON keys the test above checks.
_PROBE = """
import sys, torch
from dit_moe.models import DiT_models
from dit_moe.train import engine as engine_lib
from dit_moe.train.config import RunSection
engine_lib.init_distributed()
for name in sys.argv[1:]:
    run = RunSection(deepspeed_config=f"config/{name}.json", global_batch_size=4, grad_accum_steps=2, precision="bf16")
    ds_config, _, precision = engine_lib.prepare_deepspeed_config(run, 1, torch.device("cpu"))
    ds_config["zero_optimization"].pop("offload_optimizer", None)
    model = DiT_models["DiT-T/2"](input_size=8, in_channels=1, num_classes=10, num_experts=4)
    engine = engine_lib.initialize(model, ds_config)
    opt = engine.optimizer
    print("probe", name, precision, engine.communication_data_type, opt.communication_data_type,
          engine.get_data_types()[1], opt.gradient_accumulation_dtype, flush=True)
"""


@pytest.mark.parametrize("name", BF16_CONFIGS)
def test_bf16_configs_ask_for_fp32_reduction_and_accumulation(name):
    config = json.loads((REPO / "config" / f"{name}.json").read_text())
    assert config["bf16"]["enabled"] and config["communication_data_type"] == "fp32"
    assert config["data_types"]["grad_accum_dtype"] == "fp32"


def test_zero1_reduces_in_fp32_and_says_why_it_accumulates_in_bf16():
    config = json.loads((REPO / "config" / "zero1.json").read_text())
    assert config["communication_data_type"] == "fp32" and "data_types" not in config
    assert "BF16_Optimizer" in (REPO / "docs" / "training.md").read_text()


@pytest.mark.slow
def test_the_engine_reduces_and_accumulates_bf16_gradients_in_fp32():
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, *BF16_CONFIGS], cwd=REPO, env=env(), capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    probes = [line.split()[1:] for line in proc.stdout.splitlines() if line.startswith("probe ")]
    fp32 = ["torch.float32"] * 4
    assert probes == [[name, "bf16", *fp32] for name in BF16_CONFIGS], proc.stdout[-2000:]
