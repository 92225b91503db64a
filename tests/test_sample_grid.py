"""sample.py / dit_moe.sampling.grid: PNG grids from tiny checkpoints, every sampler, the --rf trap, clear errors."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dit_moe.checkpoint import save_export
from dit_moe.diffusion import ObjectiveConfig
from dit_moe.models.experts import unstack_expert_state_dict
from dit_moe.sampling import SamplingOptions, SamplingRequest, prepare_sampling
from dit_moe.sampling.grid import SampleGrid, default_labels, image_grid, main, sample_grid
from dit_moe.utils.errors import UserError

from test_vae import save_tiny_vae
from tiny_dit import tiny_model

REPO = Path(__file__).resolve().parents[1]
STEPS = ["--num-sampling-steps", "2", "--device", "cpu"]


def _tiny(**kw):
    torch.manual_seed(0)
    return tiny_model(**{"in_channels": 3, **kw})


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Exports that record their objective (pixel IDDPM, pixel flow, latent IDDPM) and a
    feizc-style plain state dict (per-expert keys, no config) of a flow-trained MoE model."""
    root = tmp_path_factory.mktemp("ckpts")
    iddpm, flow = _tiny(), _tiny()
    latent = _tiny(in_channels=4, input_size=4, num_classes=4)
    feizc = _tiny(num_experts=2)
    torch.save(unstack_expert_state_dict(feizc.state_dict()), root / "feizc.pt")
    iddpm_objective, flow_objective = ObjectiveConfig(), ObjectiveConfig(objective="flow")
    return dict(
        iddpm=save_export(root / "iddpm.safetensors", iddpm.config, iddpm.state_dict(), objective=iddpm_objective),
        flow=save_export(root / "flow.pt", flow.config, flow.state_dict(), objective=flow_objective),
        latent=save_export(root / "latent.safetensors", latent.config, latent.state_dict(), objective=iddpm_objective),
        feizc=root / "feizc.pt",
        vae=save_tiny_vae(root / "vae"),  # 4 latent channels, downsample 2: 4x4 latents -> 8x8 images
    )


def _run(capsys, *argv):
    """main() in-process; (exit code, stdout, stderr)."""
    try:
        code = main([str(a) for a in argv], prog="sample.py")
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("kind, sampler", [("iddpm", "ddpm"), ("iddpm", "ddim"), ("flow", "euler"), ("flow", "heun")])
def test_each_sampler_writes_a_grid(ckpts, tmp_path, capsys, kind, sampler):
    out = tmp_path / "grid.png"
    code, stdout, err = _run(
        capsys,
        "--ckpt",
        ckpts[kind],
        "--out",
        out,
        "--sampler",
        sampler,
        "--class-labels",
        "0,1,2,3,4",
        "--cfg_scale",
        "2.0",
        "--scale",
        "1",
        *STEPS,
    )
    assert code == 0, err
    assert f"{sampler}, 2 steps" in stdout and str(out) in stdout
    grid = np.asarray(Image.open(out))
    assert grid.shape == (2 * (8 + 2) + 2, 4 * (8 + 2) + 2, 3)  # 5 images, 4 per row, 2-pixel padding
    assert grid[12:20, 2:10].std() > 0 and not grid[12:20, 12:20].any()  # image 4 drawn, slot 5 empty
    assert not list(tmp_path.glob(".*tmp*"))  # dit_moe.utils.atomic's temporary names


def test_readme_command_with_a_vae(ckpts, tmp_path, capsys):
    out = tmp_path / "sample.png"
    code, stdout, err = _run(
        capsys,
        "--model",
        "DiT-T/2",
        "--ckpt",
        ckpts["latent"],
        "--vae-path",
        ckpts["vae"],
        "--image-size",
        "8",
        "--cfg-scale",
        "1.5",
        "--out",
        out,
        *STEPS,
    )
    assert code == 0, err
    assert "classes 0,1,2,3,0,1,2,3;" in stdout  # default labels for a 4-class model: two full rows
    # 8-pixel images are enlarged 8x by default, to 64 pixels: 2 rows of 4 with 2-pixel gaps
    assert np.asarray(Image.open(out)).shape == (2 * 66 + 2, 4 * 66 + 2, 3)
    assert "4 model evaluations per image" in stdout  # 2 steps, guided: two rows each


def test_seed_decides_the_pixels(ckpts, tmp_path):
    def grid(seed, labels=(1, 2, 3, 4)):
        options = SamplingOptions(sampler="ddpm", num_steps=3, cfg_scale=1.5)
        return sample_grid(
            ckpts["iddpm"],
            tmp_path / f"{seed}-{len(labels)}.png",
            class_labels=labels,
            options=options,
            seed=seed,
            device="cpu",
        )

    first, again, other = grid(3), grid(3), grid(4)
    assert isinstance(first, SampleGrid) and first.images.shape == (4, 3, 8, 8)
    assert first.path.read_bytes() == again.path.read_bytes()
    assert (first.images - other.images).abs().amax(dim=(1, 2, 3)).min() > 1e-3
    alone = grid(3, labels=(1,))  # image 0 of a grid does not depend on the images beside it
    torch.testing.assert_close(alone.images, first.images[:1], atol=1e-4, rtol=0)


def test_flow_checkpoint_refuses_iddpm_sampling(ckpts, tmp_path, capsys):
    code, _, err = _run(capsys, "--ckpt", ckpts["flow"], "--sampler", "ddpm", "--out", tmp_path / "x.png", *STEPS)
    assert code == 2 and "--sampler ddpm cannot sample a rectified-flow model" in err and "euler or heun" in err
    code, _, err = _run(capsys, "--ckpt", ckpts["flow"], "--rf", "False", "--out", tmp_path / "x.png", *STEPS)
    assert code == 2 and "trained with rectified flow but --rf False" in err
    code, _, err = _run(capsys, "--ckpt", ckpts["iddpm"], "--rf", "True", "--out", tmp_path / "x.png", *STEPS)
    assert code == 2 and "trained with IDDPM" in err
    assert not (tmp_path / "x.png").exists()
    code, _, err = _run(capsys, "--ckpt", ckpts["flow"], "--rf", "true", "--out", tmp_path / "x.png", *STEPS)
    assert code == 0, err


def test_rf_flag_chooses_the_objective_of_a_file_without_config(ckpts, tmp_path, capsys):
    common = dict(class_labels=[0, 1], options=SamplingOptions(num_steps=2), device="cpu", num_experts_per_tok=1)
    flow = sample_grid(ckpts["feizc"], tmp_path / "rf.png", rf=True, **common)
    assert (flow.objective, flow.sampler) == ("flow", "euler") and torch.isfinite(flow.images).all()
    plain = sample_grid(ckpts["feizc"], tmp_path / "plain.png", **common)
    assert (plain.objective, plain.sampler) == ("iddpm", "ddpm")
    code, _, err = _run(capsys, "--ckpt", ckpts["feizc"], "--sampler", "euler", "--out", tmp_path / "x.png", *STEPS)
    assert code == 2 and "pass --rf True" in err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--model", "DiT-S/2"], "--model DiT-S/2 does not match the checkpoint, which holds a DiT-T/2 model"),
        (
            ["--image-size", "16"],
            "--image-size 16 does not fit this checkpoint: it generates 8x8 images; pass --image-size 8",
        ),
        (["--dtype", "bf16"], "--dtype bf16 runs the model under CUDA autocast and is not supported on cpu"),
        (["--class-labels", "3,10"], "Class labels [10] are outside this model's 0..9"),
        (["--vae-path", "/no/such/vae"], "VAE folder '/no/such/vae' does not exist"),
    ],
)
def test_bad_input_is_one_sentence(ckpts, tmp_path, capsys, extra, message):
    code, _, err = _run(capsys, "--ckpt", ckpts["iddpm"], "--out", tmp_path / "x.png", *extra, *STEPS)
    assert code == 2 and err.startswith(f"sample.py: error: {message}") and err.count("\n") == 1, err


def test_latent_model_without_vae_and_wrong_vae_size(ckpts, tmp_path, capsys):
    code, _, err = _run(capsys, "--ckpt", ckpts["latent"], "--out", tmp_path / "x.png", *STEPS)
    assert code == 2 and "4-channel latents but no --vae-path was given; pass --vae-path DIR" in err
    code, _, err = _run(
        capsys,
        "--ckpt",
        ckpts["latent"],
        "--vae-path",
        ckpts["vae"],
        "--image-size",
        "4",
        "--out",
        tmp_path / "x.png",
        *STEPS,
    )
    assert code == 2 and "4x4 latents, which the VAE decodes to 8x8 pixels; pass --image-size 8" in err


def test_entry_script_exits_2_without_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "sample.py"), "--ckpt", str(tmp_path / "missing.pt")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("sample.py: error: Checkpoint") and "does not exist" in result.stderr


def test_default_labels_and_grid_layout():
    assert default_labels(1000) == [207, 360, 387, 974, 88, 979, 417, 279]
    assert default_labels(10) == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    assert default_labels(2) == [0, 1] * 4 and len(default_labels(100)) == 16
    tiles = np.stack([np.full((2, 3, 1), 10 * (i + 1), np.uint8) for i in range(5)])  # (5, 2, 3, 1) NHWC
    grid = image_grid(tiles, nrow=2, padding=1)
    assert grid.shape == (3 * 3 + 1, 2 * 4 + 1, 1)
    assert (grid[1:3, 5:8] == 20).all() and (grid[7:9, 1:4] == 50).all() and not grid[7:9, 5:8].any()
    assert not grid[0].any() and not grid[:, 4].any()
    big = image_grid(tiles[:2], nrow=2, padding=1, scale=3)  # each pixel repeated 3x3
    assert big.shape == (1 + 6 + 1, 1 + 2 * (9 + 1), 1)
    assert (big[1:7, 1:10] == 10).all() and (big[1:7, 11:20] == 20).all() and not big[:, 10].any()


def test_dit_vae_flag_takes_none_and_says_what_to_fetch_offline(ckpts, tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))  # empty cache
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = _run(capsys, "--ckpt", ckpts["latent"], "--vae", "ema", "--out", tmp_path / "g.png")
    assert code == 2 and "stabilityai/sd-vae-ft-ema" in err and "pass --vae-path DIR" in err
    assert (
        main(
            [
                "--ckpt",
                str(ckpts["iddpm"]),
                "--vae",
                "none",
                "--num-sampling-steps",
                "2",
                "--out",
                str(tmp_path / "g.png"),
            ]
        )
        == 0
    )


def test_prepare_says_where_config_and_objective_came_from(ckpts):
    stored = prepare_sampling(SamplingRequest(ckpts["flow"], device="cpu"))
    assert (stored.config_source, stored.objective_name, stored.objective_source) == (
        "stored",
        "flow",
        "the checkpoint's config",
    )
    assert (stored.sampler, stored.num_steps) == ("euler", 50)
    inferred = prepare_sampling(
        SamplingRequest(ckpts["feizc"], objective="flow", objective_flag="--rf", num_experts_per_tok=1, device="cpu")
    )
    assert (inferred.config_source, inferred.objective_name, inferred.objective_source) == (
        "inferred",
        "flow",
        "--rf True",
    )
    with pytest.raises(UserError, match="trained with rectified flow but --objective iddpm .* pass --objective flow"):
        prepare_sampling(SamplingRequest(ckpts["flow"], objective="iddpm", device="cpu"))
    with pytest.raises(UserError, match="--noise-schedule and --diffusion-steps describe IDDPM models"):
        prepare_sampling(SamplingRequest(ckpts["flow"], noise_schedule="cosine", device="cpu"))
