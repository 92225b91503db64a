"""Every contract of ../shared/DESIGN.md that outside tests rely on, exercised once: the imports,
the command lines (parsed as written there, and run where they are cheap), and a run's outputs."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open

from dit_moe.checkpoint import dit_moe_layout, load_model, save_export
from dit_moe.diffusion import create_diffusion
from dit_moe.models import DiT_models
from dit_moe.models.flops import forward_flops
from dit_moe.sampling.grid import build_parser as sample_parser
from dit_moe.sampling.many import build_parser as many_parser
from dit_moe.train.config import load_config
from dit_moe.upcycle.tool import build_parser as upcycle_parser

from tiny_dit import tiny_model
from trainer_runs import REPO, env


def test_model_registry_contract():
    model = DiT_models["DiT-S/2"](
        input_size=32, in_channels=4, num_classes=1000, learn_sigma=True, num_experts=8, num_experts_per_tok=2
    )
    x, t, y = torch.randn(1, 4, 32, 32), torch.tensor([500]), torch.tensor([3])
    with torch.no_grad():
        assert model(x, t, y).shape == (1, 8, 32, 32)
    for dense in (0, None):
        built = DiT_models["DiT-S/2"](input_size=32, num_experts=dense)
        assert built.config.moe is None and not built.moe_blocks
        assert round(sum(p.numel() for p in built.parameters()) / 1e6, 1) == 33.0  # DiT's paper: S/2 has 33M


def test_load_model_contract_for_every_kind_of_file(tmp_path, trained_run):
    dense = tiny_model(in_channels=4, num_experts=0)
    torch.save(dense.state_dict(), tmp_path / "DiT-official.pt")  # DiT's released files: a bare state dict
    moe = tiny_model(in_channels=4, num_experts=4, num_experts_per_tok=2)
    torch.save({"model": dit_moe_layout(moe.state_dict())}, tmp_path / "dit_moe.pt")  # feizc/DiT-MoE's layout
    export = save_export(tmp_path / "ours.safetensors", moe.config, moe.state_dict())
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([1, 900]), torch.tensor([0, 5])
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path / "DiT-official.pt")(x, t, y), dense.eval()(x, t, y))
        assert torch.equal(load_model(tmp_path / "dit_moe.pt")(x, t, y), moe.eval()(x, t, y))
        assert torch.equal(load_model(export)(x, t, y), moe(x, t, y))
    from_run = load_model(trained_run / "checkpoints")  # the latest complete DeepSpeed tag
    assert from_run.config.num_experts == 4 and from_run.config.input_size == 8


def test_diffusion_contract():
    model = tiny_model(in_channels=4, num_experts=0).eval()
    d = create_diffusion(timestep_respacing="", noise_schedule="linear", learn_sigma=True)
    x_start, y = torch.randn(2, 4, 8, 8), torch.tensor([1, 2])
    t, noise = torch.tensor([10, 900]), torch.randn(2, 4, 8, 8)
    loss = d.training_losses(model, x_start, t, model_kwargs=dict(y=y), noise=noise)["loss"]
    assert loss.shape == (2,) and torch.isfinite(loss).all()
    fast = create_diffusion(timestep_respacing="5")
    shape, start = (2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        ddpm = fast.p_sample_loop(model, shape, start, clip_denoised=False, model_kwargs=dict(y=y), progress=True)
        ddim = fast.ddim_sample_loop(model, shape, start, clip_denoised=False, model_kwargs=dict(y=y), eta=0.0)
    assert ddpm.shape == ddim.shape == shape and not torch.equal(ddpm, ddim)


def test_flops_contract():
    counts = forward_flops(DiT_models["DiT-XL/2"](input_size=32, num_experts=0).config)
    assert isinstance(counts, dict) and sum(counts.values()) / 2 / 1e9 == pytest.approx(
        118.6, rel=0.01
    )  # DiT: 118.6 GFLOPs


def test_command_lines_parse_as_written():
    cfg = load_config(
        "--deepspeed_config config/zero2.json --model DiT-S/2 --num_experts 8 --num_experts_per_tok 2 "
        "--data-path DIR --vae-path none --image-size 256 --train_batch_size 32 --rf True".split()
    )
    assert (cfg.model.model, cfg.model.num_experts, cfg.model.num_experts_per_tok) == ("DiT-S/2", 8, 2)
    assert (cfg.data.data_path, cfg.run.micro_batch_size, cfg.objective.objective) == ("DIR", 32, "flow")
    cfg = load_config(
        "--deepspeed_config config/zero3.json --model DiT-T/2 --num_experts 4 --num_experts_per_tok 2 --dataset digits "
        "--global-batch-size 8 --max-steps 5 --log-every 1 --ckpt-every 2 --global-seed 0 --results-dir OUT "
        "--resume auto --ep-size 2 --precision bf16 --noise-schedule cosine --init-from F.pt "
        "--elastic-checkpoints false".split()
    )
    assert (cfg.run.global_batch_size, cfg.run.resume, cfg.run.precision, cfg.model.init_from) == (
        8,
        "auto",
        "bf16",
        "F.pt",
    )
    assert (cfg.objective.noise_schedule, cfg.run.elastic_checkpoints) == ("cosine", False)
    sample = sample_parser().parse_args(
        "--model DiT-XL/2 --ckpt FILE --vae-path DIR --image-size 256 --cfg-scale 1.5 --class-labels 1,2 "
        "--num-sampling-steps 4 --seed 3 --device cpu --out F.png --rf True".split()
    )
    assert (sample.ckpt, sample.cfg_scale, sample.class_labels, sample.num_sampling_steps) == ("FILE", 1.5, [1, 2], 4)
    up = upcycle_parser().parse_args(
        "--model DiT-S/2 --ckpt dense.pt --num_experts 8 --num_experts_per_tok 2 --out moe.pt".split()
    )
    assert (up.ckpt, up.num_experts, up.num_experts_per_tok, up.out) == ("dense.pt", 8, 2, "moe.pt")
    many = many_parser().parse_args(
        "--ckpt F --num-samples 8 --out DIR --npz F.npz --sampler euler --num-sampling-steps 4 --cfg-scale 1.5 "
        "--batch-size 4 --seed 0".split()
    )
    assert (many.num_samples, many.sampler, many.batch_size) == (8, "euler", 4)


@pytest.mark.slow
def test_trainer_outputs_contract(trained_run):
    records = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in records)
    with safe_open(str(trained_run / "export.safetensors"), framework="pt") as f:
        meta = f.metadata()
        assert json.loads(meta["config"])["moe"]["num_experts"] == 4 and "objective" in meta
        assert any(k.startswith("ema.") for k in f.keys()) and any(k.startswith("model.") for k in f.keys())
    saves = re.findall(
        r"\[\d\d:\d\d:\d\d\] Saved the checkpoint of step (\d+) in [\d.]+ s\.", (trained_run / "log.txt").read_text()
    )
    assert saves == ["2", "4"]


def _run(*args):
    return subprocess.run(
        [sys.executable, *map(str, args)], cwd=REPO, env=env(), capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow
def test_sample_many_and_upcycle_command_lines_run(tiny_export, tmp_path):
    png = tmp_path / "grid.png"
    proc = _run(
        "sample.py",
        "--ckpt",
        tiny_export,
        "--vae-path",
        "none",
        "--image-size",
        "8",
        "--class-labels",
        "1,2",
        "--num-sampling-steps",
        "2",
        "--cfg-scale",
        "1.5",
        "--seed",
        "0",
        "--device",
        "cpu",
        "--out",
        png,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    npz = tmp_path / "s.npz"
    proc = _run(
        "-m",
        "dit_moe.sampling.many",
        "--ckpt",
        tiny_export,
        "--num-samples",
        "4",
        "--out",
        tmp_path / "many",
        "--npz",
        npz,
        "--sampler",
        "euler",
        "--num-sampling-steps",
        "2",
        "--cfg-scale",
        "1.5",
        "--batch-size",
        "2",
        "--seed",
        "0",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert np.load(npz)["arr_0"].shape == (4, 8, 8, 3)
    dense = tiny_model(in_channels=3, num_experts=0)
    src = save_export(tmp_path / "dense.safetensors", dense.config, dense.state_dict())
    proc = _run(
        "upcycle.py",
        "--model",
        "DiT-T/2",
        "--ckpt",
        src,
        "--num_experts",
        "8",
        "--num_experts_per_tok",
        "2",
        "--out",
        tmp_path / "moe.pt",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert load_model(tmp_path / "moe.pt").config.num_experts == 8


def test_plan_json_contract(capsys):
    from dit_moe.plan.cli import main as plan

    code = plan(
        ["--model", "DiT-XL/2", "--num-experts", "8", "--num-experts-per-tok", "2", "--image-size", "256", "--json"]
    )
    report = json.loads(capsys.readouterr().out)
    assert code == 0
    for key in (
        "parameters",
        "per_gpu_gib",
        "fits",
        "max_micro_batch",
        "checkpoint_gib",
        "all_to_all_bytes_per_step",
        "flops_per_image",
    ):
        assert key in report, key
    assert set(report["per_gpu_gib"]) >= {"params", "grads", "optimizer", "ema", "activations", "buffers", "total"}
    assert set(report["checkpoint_gib"]) >= {"per_rank", "total"}


def test_diffusers_export_command_line_contract():
    proc = _run("-m", "dit_moe.diffusers", "export", "--help")
    assert proc.returncode == 0 and "--ckpt" in proc.stdout and "--out" in proc.stdout
