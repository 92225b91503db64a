"""config/dit_moe_zero2.json restates feizc/DiT-MoE's config/zero2.json engine settings (its batch sizes
are left to the trainer, which derives them from one training config), and README's "coming from" row
for DiT-MoE's training line names it."""

import json
from pathlib import Path

import torch

from dit_moe.train.engine import apply_precision, load_deepspeed_config

REPO = Path(__file__).resolve().parents[1]
# feizc/DiT-MoE config/zero2.json: fp16 with a dynamic loss scale, AdamW, ZeRO-2, and no gradient clipping.
DIT_MOE_FP16 = {"enabled": True, "loss_scale": 0, "loss_scale_window": 1000, "initial_scale_power": 16,
                "hysteresis": 2, "min_loss_scale": 1}  # fmt: skip
DIT_MOE_ADAMW = {"lr": 1e-4, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0}


def test_dit_moe_engine_settings_match_its_zero2_config():
    config = load_deepspeed_config(str(REPO / "config/dit_moe_zero2.json"))
    assert config["fp16"] == DIT_MOE_FP16 and not config["bf16"]["enabled"]
    assert config["optimizer"] == {"type": "AdamW", "params": DIT_MOE_ADAMW}
    assert config.get("gradient_clipping", 0) == 0  # DeepSpeed's default: no clipping
    zero = config["zero_optimization"]
    assert zero["stage"] == 2 and zero["overlap_comm"] and zero["contiguous_gradients"]
    assert not {"train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"} & set(config)
    assert apply_precision(config, "auto", torch.device("cuda")) == "fp16"  # GPUs train it in fp16, as DiT-MoE


def test_readme_coming_from_row_uses_it():
    row = next(line for line in (REPO / "README.md").read_text().splitlines() if "--train_batch_size 32" in line)
    assert "config/dit_moe_zero2.json" in row and json.loads((REPO / "config/dit_moe_zero2.json").read_text())
