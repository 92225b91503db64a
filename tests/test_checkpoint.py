"""load_model: official DiT layouts, our exports, architecture inference and clear errors."""

import pytest
import torch

from dit_moe.checkpoint import CheckpointError, infer_config, load_model, read_checkpoint_file, save_export
from dit_moe.models import DiT_models

from reference_dit import randomize_
from tiny_dit import tiny_model


def _tiny(**kw):
    return tiny_model(input_size=16, **kw)


def _inputs():
    return torch.randn(2, 4, 16, 16), torch.tensor([5, 900]), torch.tensor([3, 7])


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_export_round_trip_prefers_ema(tmp_path, suffix):
    model, ema = _tiny(num_experts=4, qk_norm=True), _tiny(num_experts=4, qk_norm=True)
    path = save_export(tmp_path / f"export{suffix}", model.config, model.state_dict(), ema.state_dict())
    loaded = load_model(path)
    assert loaded.config == model.config
    x, t, y = _inputs()
    torch.testing.assert_close(loaded(x, t, y), ema(x, t, y))
    raw = load_model(path, prefer_ema=False)
    torch.testing.assert_close(raw(x, t, y), model(x, t, y))
    assert not list(tmp_path.glob("*.tmp"))


def test_bare_official_state_dict_infers_architecture(tmp_path):
    model = randomize_(DiT_models["DiT-S/4"](input_size=16, in_channels=4, num_classes=10, learn_sigma=False)).eval()
    torch.save(model.state_dict(), tmp_path / "dit.pt")
    loaded = load_model(tmp_path / "dit.pt")
    cfg = loaded.config
    assert (cfg.depth, cfg.hidden_size, cfg.num_heads, cfg.patch_size) == (12, 384, 6, 4)
    assert (cfg.input_size, cfg.in_channels, cfg.num_classes, cfg.learn_sigma, cfg.num_experts) == (16, 4, 10, False, 0)
    x, t, y = _inputs()
    torch.testing.assert_close(loaded(x, t, y), model(x, t, y))


def test_train_py_dict_with_args_prefers_ema(tmp_path):
    import argparse

    model, ema = _tiny(), _tiny()
    blob = {
        "model": {f"module.{k}": v for k, v in model.state_dict().items()},
        "ema": ema.state_dict(),
        "opt": {},
        "args": argparse.Namespace(model="DiT-T/2"),
    }
    torch.save(blob, tmp_path / "0001000.pt")
    x, t, y = _inputs()
    torch.testing.assert_close(load_model(tmp_path / "0001000.pt")(x, t, y), ema(x, t, y))
    torch.testing.assert_close(load_model(tmp_path / "0001000.pt", prefer_ema=False)(x, t, y), model(x, t, y))


def test_flash_attention_key_layout_loads(tmp_path):
    model = _tiny(qk_norm=True)
    renamed = {
        k.replace("attn.qkv.", "attn.Wqkv.").replace("attn.proj.", "attn.out_proj."): v
        for k, v in model.state_dict().items()
    }
    torch.save(renamed, tmp_path / "flash.pt")
    loaded = load_model(tmp_path / "flash.pt")
    assert loaded.config.qk_norm and loaded.config.num_heads == 4
    x, t, y = _inputs()
    torch.testing.assert_close(loaded(x, t, y), model(x, t, y))


def test_infer_config_moe_layout():
    model = _tiny(num_experts=4, num_experts_per_tok=1, n_shared_experts=0, moe_layers=[1, 3])
    cfg = infer_config(model.state_dict(), num_experts_per_tok=1)
    assert (cfg.num_experts, cfg.moe.moe_layers, cfg.moe.n_shared_experts, cfg.moe.expert_type) == (
        4,
        [1, 3],
        0,
        "swiglu",
    )


def test_errors_are_clear(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "missing.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="could not be read"):
        load_model(tmp_path / "garbage.pt")
    torch.save({"encoder.weight": torch.zeros(3)}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a DiT checkpoint"):
        load_model(tmp_path / "foreign.pt")
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointError, match="safetensors"):
        load_model(tmp_path / "bad.safetensors")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(CheckpointError, match="not a DeepSpeed checkpoint"):
        load_model(tmp_path / "empty_dir")
    sd = _tiny().state_dict()
    sd.pop("blocks.2.mlp.fc1.weight")
    torch.save(sd, tmp_path / "truncated.pt")
    with pytest.raises(CheckpointError, match="does not match"):
        load_model(tmp_path / "truncated.pt")


def test_how_a_file_was_trained_is_one_typed_value(tmp_path):
    """Recorded, legacy, judged from the keys, unknown: decided once, in the reader."""
    from dit_moe.checkpoint import ObjectiveSource
    from dit_moe.diffusion import ObjectiveConfig

    dense = tiny_model(in_channels=4, num_experts=0)
    torch.save(dense.state_dict(), tmp_path / "official.pt")  # DiT's released layout: IDDPM by its keys
    judged = read_checkpoint_file(tmp_path / "official.pt").trained_as
    assert judged.source is ObjectiveSource.KEYS and judged.objective == ObjectiveConfig()
    assert judged.recorded is None and judged.known_fields() == ("objective",)
    flow = ObjectiveConfig(objective="flow", flow_t_scale=1000.0)
    export = save_export(tmp_path / "ours.safetensors", dense.config, dense.state_dict(), objective=flow)
    recorded = read_checkpoint_file(export).trained_as
    assert recorded.source is ObjectiveSource.RECORDED and recorded.recorded == flow and recorded.judged is None
    assert recorded.known_fields() == ("objective", "flow_t_scale", "noise_schedule", "diffusion_steps")
    moe = tiny_model(in_channels=4, num_experts=4, num_experts_per_tok=2)
    bare = save_export(tmp_path / "bare.safetensors", moe.config, moe.state_dict())  # no objective, our keys
    unknown = read_checkpoint_file(bare).trained_as
    assert unknown.source is ObjectiveSource.UNKNOWN and unknown.objective is None and unknown.known_fields() == ()
