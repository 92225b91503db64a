"""Trainer configuration: DiT-MoE flags, spellings, booleans, YAML + overrides, batch reconciliation."""

from pathlib import Path

import pytest

from dit_moe.models import DiT_models
from dit_moe.train.config import BatchPlan, RunSection, build_parser, load_config

DIGITS = ["--dataset", "digits"]


def test_dit_moe_readme_flags_parse_with_both_spellings():
    cfg = load_config(
        [
            "--deepspeed_config",
            "config/zero2.json",
            "--model",
            "DiT-S/2",
            "--num_experts",
            "8",
            "--num-experts-per-tok",
            "2",
            "--data-path",
            "/data",
            "--vae-path",
            "/vae",
            "--image-size",
            "256",
            "--train_batch_size",
            "32",
            "--rf",
            "True",
            "--global_seed",
            "7",
            "--ckpt-every",
            "500",
            "--log_every",
            "10",
            "--results_dir",
            "out",
            "--epochs",
            "3",
            "--accum_iter",
            "4",
        ]
    )
    assert cfg.run.deepspeed_config == "config/zero2.json" and cfg.model.model == "DiT-S/2"
    assert (cfg.model.num_experts, cfg.model.num_experts_per_tok) == (8, 2)
    assert (cfg.data.data_path, cfg.data.vae_path, cfg.data.image_size) == ("/data", "/vae", 256)
    assert cfg.run.micro_batch_size == 32 and cfg.run.seed == 7
    assert cfg.run.grad_accum_steps == 4
    assert cfg.data.dataset == "folder"  # --data-path alone means an image folder, as in DiT-MoE
    assert cfg.objective.objective == "flow"
    assert (cfg.run.ckpt_every, cfg.run.log_every, cfg.run.results_dir, cfg.run.epochs) == (500, 10, "out", 3)


@pytest.mark.parametrize("text,expected", [("False", "iddpm"), ("false", "iddpm"), ("0", "iddpm"), ("True", "flow")])
def test_rf_is_a_real_boolean(text, expected):
    assert load_config(DIGITS + ["--rf", text]).objective.objective == expected


def test_boolean_and_optional_fields():
    cfg = load_config(DIGITS + ["--grad-checkpointing", "true", "--capacity-factor", "none", "--moe-layers", "1,3"])
    assert cfg.model.grad_checkpointing is True and cfg.model.capacity_factor is None
    assert cfg.model.moe_layers == [1, 3]
    with pytest.raises(SystemExit):
        load_config(DIGITS + ["--grad-checkpointing", "maybe"])


def test_yaml_then_flags(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("model:\n  model: DiT-B/4\n  num_experts: 16\nrun:\n  max_steps: 9\n  ema_decay: 0.99\n")
    cfg = load_config(["--config", str(path), "--num-experts", "4"] + DIGITS)
    assert cfg.model.model == "DiT-B/4" and cfg.model.num_experts == 4
    assert cfg.run.max_steps == 9 and cfg.run.ema_decay == 0.99
    path.write_text("model:\n  nmu_experts: 4\n")
    with pytest.raises(ValueError, match="unknown keys"):
        load_config(["--config", str(path)])


def test_validation_messages():
    with pytest.raises(ValueError, match="Unknown --model"):
        load_config(DIGITS + ["--model", "DiT-Q/2"])
    with pytest.raises(ValueError, match="--data-path"):
        load_config(["--dataset", "folder", "--vae-path", "/vae"])
    with pytest.raises(ValueError, match="--vae-path"):
        load_config(["--dataset", "folder", "--data-path", "/data"])


def _run(**kw):
    return RunSection(**kw)


def test_batch_plan_reconciles_and_names_the_numbers():
    plan = BatchPlan.resolve(_run(global_batch_size=256), world_size=8, ds_config={})
    assert (plan.micro_batch, plan.grad_accum, plan.global_batch) == (32, 1, 256)
    plan = BatchPlan.resolve(_run(micro_batch_size=4, global_batch_size=64), world_size=2, ds_config={})
    assert (plan.micro_batch, plan.grad_accum) == (4, 8)
    plan = BatchPlan.resolve(_run(micro_batch_size=4), world_size=2, ds_config={})
    assert plan.global_batch == 8
    # DiT-MoE's JSON carries train_batch_size=256 and accumulation 1
    legacy = {"train_micro_batch_size_per_gpu": 32, "train_batch_size": 256, "gradient_accumulation_steps": 1}
    assert BatchPlan.resolve(_run(), world_size=8, ds_config=legacy).global_batch == 256
    with pytest.raises(ValueError, match=r"micro batch 32 x grad accumulation 1 x world size 1 = 32.*256"):
        BatchPlan.resolve(_run(), world_size=1, ds_config=legacy)
    with pytest.raises(ValueError, match=r"Global batch 10 is not divisible by micro batch 3 x world size 2"):
        BatchPlan.resolve(_run(micro_batch_size=3, global_batch_size=10), world_size=2, ds_config={})
    with pytest.raises(ValueError, match="Set a batch size"):
        BatchPlan.resolve(_run(), world_size=1, ds_config={})


@pytest.mark.parametrize(
    "path", sorted((Path(__file__).resolve().parents[1] / "config").glob("*.yaml")), ids=lambda p: p.name
)
def test_shipped_experiment_yamls_load(path):
    cfg = load_config(
        ["--config", str(path), "--features-path", "/data/latents"]
        if "latents" in path.read_text()
        else ["--config", str(path)]
    )
    assert cfg.model.model in DiT_models and cfg.run.global_batch_size


def test_every_flag_has_help_from_its_commented_default():
    text = build_parser().format_help()
    assert "0: dense DiT (default: 8)" in text and "expert-parallel group size (default: 1)" in text


def test_fast_dit_feature_path_spelling_means_features_path(tmp_path):
    (tmp_path / "imagenet256_features").mkdir()
    cfg = load_config(["--feature-path", str(tmp_path), "--num-classes", "1000"])
    assert cfg.data.features_path == str(tmp_path) and cfg.data.dataset == "npy"


def test_every_model_field_is_a_flag_and_reaches_the_config():
    cfg = load_config(
        DIGITS
        + [
            "--model",
            "DiT-T/2",
            "--mlp-ratio",
            "2",
            "--grouped-gemm",
            "off",
            "--qk_norm_eps",
            "1e-6",
            "--num-experts",
            "4",
            "--hidden-size",
            "64",
        ]
    )
    config = cfg.model.architecture(input_size=8, in_channels=1, num_classes=10)
    assert (config.mlp_ratio, config.qk_norm_eps, config.hidden_size, config.depth) == (2.0, 1e-6, 64, 6)
    assert (config.moe.grouped_gemm, config.moe.num_experts) == ("off", 4)
    assert config.moe.num_experts_per_tok == 2  # DiT-MoE's default top-k, from MoEArgs
    model = DiT_models["DiT-T/2"](
        input_size=8, in_channels=1, num_classes=10, mlp_ratio=2.0, hidden_size=64, num_experts=4
    )
    assert model.blocks[0].moe.experts.gate_proj.shape == (4, 128, 64)  # [E, mlp_ratio x hidden, hidden]
    dense = load_config(DIGITS + ["--num-experts", "0"]).model.architecture(32, 4, 1000)
    assert dense.moe is None
    with pytest.raises(ValueError, match="grouped_gemm"):
        load_config(DIGITS + ["--grouped-gemm", "sometimes"])


def test_yaml_accepts_every_model_field(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("model:\n  model: DiT-T/2\n  mlp_ratio: 3.0\n  z_loss_coef: 0.001\n")
    config = load_config(["--config", str(path)] + DIGITS).model.architecture(8, 1, 10)
    assert config.mlp_ratio == 3.0 and config.moe.z_loss_coef == 0.001


def test_the_cpu_op_build_is_announced_only_when_it_will_happen(tmp_path, monkeypatch, capsys):
    from dit_moe.train import engine

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    engine.say_if_cpu_op_builds()
    assert "Building DeepSpeed's CPU communication op once" in capsys.readouterr().err
    engine.cpu_op_cache().parent.mkdir(parents=True)
    engine.cpu_op_cache().write_bytes(b"built")
    engine.say_if_cpu_op_builds()
    assert capsys.readouterr().err == ""
