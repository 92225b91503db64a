"""The DeepSpeed JSON is read with DeepSpeed's own rules: what DeepSpeed accepts is accepted (DiT-MoE's
config/zero2.json ends an object with a trailing comma), what it refuses is one sentence."""

import hjson
import pytest
from deepspeed.runtime.config import DeepSpeedConfig
from deepspeed.runtime.config_utils import dict_raise_error_on_duplicate_keys

from dit_moe.train.deepspeed_config import load_deepspeed_config
from dit_moe.utils.errors import UserError

# feizc/DiT-MoE config/zero2.json, restated: note the comma after "steps_per_print".
DIT_MOE_ZERO2 = """{
    "fp16": {"enabled": true, "loss_scale": 0, "loss_scale_window": 1000, "initial_scale_power": 16,
             "hysteresis": 2, "min_loss_scale": 1},
    "optimizer": {"type": "AdamW", "params": {"lr": 0.0001, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0}},
    "bf16": {"enabled": false},
    "train_micro_batch_size_per_gpu": 32,
    "train_batch_size": 256,
    "gradient_accumulation_steps": 1,
    "zero_optimization": {"stage": 2, "overlap_comm": true, "contiguous_gradients": true, "sub_group_size": 1e9},
    "steps_per_print": 10000,
}
"""


def test_dit_moe_zero2_with_its_trailing_comma_reads_as_deepspeed_reads_it(tmp_path):
    path = tmp_path / "zero2.json"
    path.write_text(DIT_MOE_ZERO2)
    ours = load_deepspeed_config(str(path))
    # DeepSpeedConfig.__init__ reads a file path exactly so (deepspeed/runtime/config.py, 0.19.8)
    theirs = hjson.load(open(path), object_pairs_hook=dict_raise_error_on_duplicate_keys)
    assert ours == theirs
    assert ours["zero_optimization"]["stage"] == 2 and ours["fp16"]["enabled"] is True


def test_what_deepspeed_refuses_is_one_sentence(tmp_path):
    duplicate = tmp_path / "dup.json"
    duplicate.write_text('{"train_batch_size": 8, "train_batch_size": 16}')
    with pytest.raises(ValueError, match="Duplicate keys"):
        DeepSpeedConfig(str(duplicate))  # DeepSpeed refuses it
    with pytest.raises(UserError, match="dup.json: the key appears more than once: train_batch_size"):
        load_deepspeed_config(str(duplicate))
    broken = tmp_path / "broken.json"
    broken.write_text('{"zero_optimization": {"stage": 2}')
    with pytest.raises(UserError, match="broken.json is not valid JSON"):
        load_deepspeed_config(str(broken))
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    with pytest.raises(UserError, match="not a JSON object"):
        load_deepspeed_config(str(listed))
