"""The README's "Coming from" lines against what the references do (issue 16): DiT-MoE's DeepSpeed
training line builds DiT-MoE's flash-attention block, DiT-MoE's sample.py line on one of its flow
files gives its Euler samples, files that record no objective are judged by their layout, and
--init-from keeps the file's objective. The reference formulas are restated from feizc/DiT-MoE's
models.py (FlashSelfMHAModified, SparseMoeBlock), diffusion/rectified_flow.py (sample_with_xps)
and sample.py."""

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dit_moe.checkpoint import dit_moe_layout, load_model, objective_evidence, read_checkpoint_file, save_export
from dit_moe.diffusion import ObjectiveConfig
from dit_moe.models.experts import unstack_expert_state_dict
from dit_moe.sampling import SamplingRequest, per_sample_noise, prepare_sampling
from dit_moe.sampling.grid import image_grid, main
from dit_moe.train.build import build_model_config
from dit_moe.train.config import load_config
from dit_moe.train.loop import settled_config
from dit_moe.utils.errors import UserError

from test_vae import save_tiny_vae
from tiny_dit import tiny_model
from trainer_runs import REPO, env, losses

DIT_MOE_LINE = [
    "--deepspeed_config",
    "config/zero2.json",
    "--model",
    "DiT-T/2",
    "--num_experts",
    "4",
    "--num_experts_per_tok",
    "2",
]


def dit_moe_flash_attention(attn: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """FlashSelfMHAModified.forward restated in fp32: Wqkv -> [b, s, 3, h, d], LayerNorm(d, eps 1e-6,
    affine) on q and k, softmax(q k^T / sqrt(d)) v, out_proj."""
    b, s, d = x.shape
    h = attn.num_heads
    qkv = F.linear(x, attn.qkv.weight, attn.qkv.bias).view(b, s, 3, h, d // h)
    q, k, v = qkv.unbind(dim=2)  # [b, s, h, d]
    q = F.layer_norm(q, (d // h,), attn.q_norm.weight, attn.q_norm.bias, eps=1e-6)
    k = F.layer_norm(k, (d // h,), attn.k_norm.weight, attn.k_norm.bias, eps=1e-6)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [b, h, s, d]
    context = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d // h), dim=-1) @ v
    return F.linear(context.transpose(1, 2).reshape(b, s, d), attn.proj.weight, attn.proj.bias)


def dit_moe_block_keys(block: int, num_experts: int) -> set[str]:
    """The parameter names of one DiT-MoE DiTBlock built with use_flash_attn=True (models.py)."""
    attn = [f"attn.{name}.{p}" for name in ("Wqkv", "q_norm", "k_norm", "out_proj") for p in ("weight", "bias")]
    experts = [
        f"moe.experts.{e}.{proj}.weight" for e in range(num_experts) for proj in ("gate_proj", "up_proj", "down_proj")
    ]
    shared = [f"moe.shared_experts.{proj}.weight" for proj in ("gate_proj", "up_proj", "down_proj")]
    rest = ["moe.gate.weight", "adaLN_modulation.1.weight", "adaLN_modulation.1.bias"]
    return {f"blocks.{block}.{key}" for key in attn + experts + shared + rest}


def test_dit_moe_line_builds_its_flash_block_and_dense_lines_keep_dit():
    config = load_config(DIT_MOE_LINE + ["--dataset", "digits"]).model.architecture(8, 3, 10)
    assert config.qk_norm and config.qk_norm_eps == 1e-6 and config.moe_shape == "4E2A"
    dense = load_config(DIT_MOE_LINE + ["--dataset", "digits", "--num_experts", "0"]).model.architecture(8, 3, 10)
    assert not dense.qk_norm and dense.moe is None  # facebookresearch/DiT's block: no QK-norm
    told = load_config(DIT_MOE_LINE + ["--dataset", "digits", "--qk-norm", "False"]).model.architecture(8, 3, 10)
    assert not told.qk_norm
    model = tiny_model(**{k: getattr(config, k) for k in ("qk_norm", "qk_norm_eps")}, num_experts=4)
    x = torch.randn(2, 16, 128)
    attn = model.blocks[0].attn
    torch.testing.assert_close(attn(x), dit_moe_flash_attention(attn, x), atol=1e-5, rtol=1e-5)


def test_export_converts_to_dit_moe_keys_and_back(tmp_path):
    model = tiny_model(in_channels=3, num_experts=4, qk_norm=True)
    theirs = dit_moe_layout(model.state_dict())
    assert {k for k in theirs if k.startswith("blocks.1.")} == dit_moe_block_keys(1, 4)
    torch.save(theirs, tmp_path / "dit_moe.pt")
    back = load_model(tmp_path / "dit_moe.pt")
    x, t, y = torch.randn(2, 3, 8, 8), torch.rand(2), torch.tensor([0, 3])
    torch.testing.assert_close(back(x, t, y), model(x, t, y))
    assert back.config.qk_norm_eps == 1e-6


@pytest.fixture()
def dit_moe_flow_file(tmp_path):
    """A tiny model in DiT-MoE's flash layout with no config: how its released flow files look."""
    torch.manual_seed(0)
    model = tiny_model(in_channels=3, num_experts=4, qk_norm=True, learn_sigma=True)
    torch.save(dit_moe_layout(model.state_dict()), tmp_path / "dit_moe_xl_8E2A.pt")
    return tmp_path / "dit_moe_xl_8E2A.pt", model


def dit_moe_flow_samples(model, z, labels, null, steps, cfg=7.0):
    """rectified_flow.py sample_with_xps as sample.py calls it (cfg 7.0): t = i / N for i = N..1,
    separate conditional and unconditional forwards on the raw t, the first C (velocity) channels
    guided, x_{t - dt} = z - dt * v; the last returned image is the last z."""
    n = z.shape[0]
    dt = 1.0 / steps
    for i in range(steps, 0, -1):
        t = torch.full((n,), i / steps)
        vc, _ = model(z, t, labels).chunk(2, dim=1)
        vu, _ = model(z, t, null).chunk(2, dim=1)
        z = z - dt * (vu + cfg * (vc - vu))
    return z


def test_dit_moe_sample_line_on_its_flow_file_gives_its_euler_samples(dit_moe_flow_file, tmp_path, caplog):
    path, model = dit_moe_flow_file
    out = tmp_path / "sample.png"
    code = main(
        [
            "--model",
            "DiT-T/2",
            "--ckpt",
            str(path),
            "--image-size",
            "8",
            "--class-labels",
            "1,2",
            "--num-sampling-steps",
            "4",
            "--seed",
            "5",
            "--device",
            "cpu",
            "--out",
            str(out),
            "--scale",
            "1",  # the image_grid below is not enlarged
        ]
    )
    note = [r.getMessage() for r in caplog.records if r.name == "dit_moe.sampling"]
    assert code == 0 and len(note) == 1 and "flash-attention keys" in note[0] and "--rf False to override" in note[0]
    z = per_sample_noise([5, 6], (3, 8, 8))
    with torch.no_grad():
        expected = dit_moe_flow_samples(model.eval(), z, torch.tensor([1, 2]), torch.tensor([10, 10]), steps=4)
    got = np.asarray(Image.open(out).convert("RGB")).astype(int)
    assert np.abs(got - image_grid(expected.clamp(-1, 1)).astype(int)).max() <= 1


def test_files_that_record_no_objective_are_judged_by_their_layout(dit_moe_flow_file, tmp_path):
    path, model = dit_moe_flow_file
    assert objective_evidence(read_checkpoint_file(path).state_dict)[0] == ObjectiveConfig(objective="flow")
    dense = tiny_model(in_channels=3)  # facebookresearch/DiT's layout
    assert objective_evidence(dense.state_dict())[0] == ObjectiveConfig()
    ddpm = unstack_expert_state_dict(tiny_model(in_channels=3, num_experts=4).state_dict())  # DiT-MoE train.py
    assert objective_evidence(ddpm)[0] == ObjectiveConfig()
    ours = tiny_model(in_channels=3, num_experts=4).state_dict()  # stacked experts, no config: no reference wrote it
    torch.save(ours, tmp_path / "bare.pt")
    assert objective_evidence(ours)[0] is None
    with pytest.raises(UserError, match="records no objective .* --rf True .* --rf False"):
        prepare_sampling(SamplingRequest(tmp_path / "bare.pt", objective_flag="--rf", device="cpu"))
    told = prepare_sampling(
        SamplingRequest(tmp_path / "bare.pt", objective="flow", objective_flag="--rf", device="cpu")
    )
    assert told.objective_name == "flow" and told.options.cfg_scale == 1.5


def test_init_from_keeps_the_files_objective(dit_moe_flow_file, tmp_path):
    path, _ = dit_moe_flow_file
    contents = read_checkpoint_file(path)

    def settled(*flags):
        cfg = load_config(DIT_MOE_LINE + ["--dataset", "digits", "--init-from", str(path), *flags])
        return settled_config(cfg, None, contents)

    def config_for(*flags):
        return build_model_config(settled(*flags), 3, 8, 10, contents)

    # The file's objective needs no flag: DiT-MoE's flash layout means rectified flow on the raw t.
    assert (settled().objective.objective, settled().objective.flow_t_scale) == ("flow", 1.0)
    with pytest.raises(UserError, match=r"--flow-t-scale 1000.0 \(it records 1.0\).*--allow-objective-change True"):
        config_for("--rf", "True", "--flow-t-scale", "1000")  # a contradicting flag stops
    with pytest.raises(UserError, match=r"--objective iddpm \(--rf False; it records flow\)"):
        config_for("--rf", "False")
    assert config_for("--rf", "True").qk_norm
    assert settled("--allow-objective-change", "True", "--rf", "False").objective.objective == "iddpm"
    assert config_for("--allow-objective-change", "True").moe_shape == "4E2A"
    model = tiny_model(in_channels=3)
    cosine = save_export(
        tmp_path / "cosine.safetensors",
        model.config,
        model.state_dict(),
        objective=ObjectiveConfig(noise_schedule="cosine"),
    )
    cfg = load_config(["--dataset", "digits", "--init-from", str(cosine), "--noise-schedule", "linear"])
    with pytest.raises(UserError, match=r"--noise-schedule linear \(it records cosine\)"):
        settled_config(cfg, None, read_checkpoint_file(cosine))
    cfg = settled_config(
        load_config(["--dataset", "digits", "--init-from", str(cosine)]), None, read_checkpoint_file(cosine)
    )
    assert cfg.objective.noise_schedule == "cosine" and cfg.model.model == "DiT-T/2"


def _image_folder(root, count: int) -> str:
    """A DiT-style ImageFolder of `count` random 16x16 RGB images in one class."""
    images = root / "images" / "cls0"
    images.mkdir(parents=True)
    for i in range(count):
        pixels = np.random.default_rng(i).integers(0, 255, (16, 16, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(images / f"{i}.png")
    return str(root / "images")


@pytest.mark.slow
def test_dit_moe_deepspeed_line_trains_its_architecture_end_to_end(tmp_path):
    _image_folder(tmp_path, 4)
    vae = save_tiny_vae(tmp_path / "vae")
    proc = subprocess.run(
        [
            sys.executable,
            "train_deepspeed.py",
            *DIT_MOE_LINE,
            "--data-path",
            str(tmp_path / "images"),
            "--vae-path",
            vae,
            "--image-size",
            "16",
            "--train_batch_size",
            "2",
            "--rf",
            "True",
            "--max-steps",
            "1",
            "--results-dir",
            str(tmp_path / "out"),
        ],
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sdpa attention with QK-norm (LayerNorm eps 1e-06)" in proc.stdout + proc.stderr
    export = read_checkpoint_file(tmp_path / "out" / "export.safetensors")
    assert export.model_config.qk_norm and export.model_config.qk_norm_eps == 1e-6
    assert export.trained_as.recorded == ObjectiveConfig(
        objective="flow", timestep_sampler="logit-normal", flow_t_scale=1.0
    )


@pytest.mark.multiproc
def test_dit_torchrun_line_trains_dits_dense_model_on_two_ranks(tmp_path):
    """DiT's `torchrun --nproc_per_node N train.py --model M --data-path D --global-batch-size B
    --global-seed S --vae V` with our entry point and --num-experts 0 (the trainer's default is
    DiT-MoE's 8 experts): facebookresearch/DiT's dense block (no QK-norm, learned sigma, IDDPM),
    and two ranks train exactly what one process trains."""
    data, vae = _image_folder(tmp_path, 8), save_tiny_vae(tmp_path / "vae")
    line = [
        "train_deepspeed.py",
        "--model",
        "DiT-T/2",
        "--num-experts",
        "0",
        "--data-path",
        data,
        "--vae",
        vae,
        "--image-size",
        "16",
        "--global-batch-size",
        "4",
        "--global-seed",
        "0",
        "--log-every",
        "1",
        "--max-steps",
        "2",
    ]
    runs = {}
    for procs in (1, 2):
        out = tmp_path / f"procs{procs}"
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs)]
        proc = subprocess.run(
            [*launcher, *line, "--results-dir", str(out)],
            cwd=REPO,
            env=env(),
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[procs] = losses(out)
    assert sorted(runs[2]) == [1, 2] and runs[2] == pytest.approx(runs[1], rel=1e-5)
    export = read_checkpoint_file(tmp_path / "procs2" / "export.safetensors")
    config = export.model_config
    assert config.moe is None and not config.qk_norm and config.learn_sigma
    assert export.trained_as.recorded == ObjectiveConfig(timestep_sampler="uniform")
