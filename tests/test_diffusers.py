"""dit_moe.diffusers: any checkpoint as a diffusers pipeline folder that loads offline and samples as sample.py does.

Round trips for a dense DiT, a top-k DiT-MoE, an expert-choice and a fine-grained model (narrow
experts + shared experts), under IDDPM and rectified flow: the folder's transformer computes
load_model's forward exactly, and the pipeline's images are sample.py's for the same solver,
steps, guidance and seeds (to 1/255), each pipeline step restated by the diffusers scheduler that
computes it (FlowMatchEulerDiscreteScheduler for Euler, DDPMScheduler for DDPM, DDIMScheduler for DDIM).
"""

import json
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
)
from diffusers.hooks import TaylorSeerCacheConfig

from dit_moe.checkpoint import dit_moe_layout, load_model, save_export
from dit_moe.data.vae import SD_VAE_SCALE_FACTOR
from dit_moe.diffusers import (
    DiTMoEPipeline,
    DiTMoETransformer2DModel,
    ExportRequest,
    export_pipeline,
    load_pipeline,
    scheduler_for,
)
from dit_moe.diffusers.__main__ import main as export_main
from dit_moe.diffusers.pipeline import iddpm_respaced_timesteps
from dit_moe.diffusion import ObjectiveConfig, create_diffusion, space_timesteps
from dit_moe.evaluation import DigitsScorer
from dit_moe.evaluation.npz import to_uint8_nhwc
from dit_moe.sampling import SamplingOptions, SamplingRequest, prepare_sampling
from dit_moe.utils.errors import UserError

from tiny_dit import tiny_model

# name: (DiT overrides, objective); pixel-space 1-channel 8x8 models with 10 classes, like the digits.
MODELS = {
    "dense-iddpm": (dict(num_experts=0), ObjectiveConfig(objective="iddpm", diffusion_steps=100)),
    "topk-flow": (dict(num_experts=4, num_experts_per_tok=2), ObjectiveConfig(objective="flow", flow_t_scale=1000.0)),
    "expert-choice-iddpm": (
        dict(num_experts=4, num_experts_per_tok=2, router="expert-choice"),
        ObjectiveConfig(objective="iddpm", diffusion_steps=100, noise_schedule="cosine"),
    ),
    "fine-grained-flow": (
        dict(num_experts=8, num_experts_per_tok=2, expert_width_ratio=0.25, num_shared_experts=2),
        ObjectiveConfig(objective="flow"),
    ),
}
FIXTURES = Path(__file__).parent / "fixtures"
SEEDS = [0, 1, 2]
DIGITS_SAMPLES = 100
LABELS = [3, 7, 3]


@pytest.fixture
def no_network(monkeypatch):
    """The hub offline, and any socket connection an error: loading must need neither."""
    import huggingface_hub.constants

    def refuse(*args, **kwargs):
        raise OSError("network access during an offline test")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(socket.socket, "connect", refuse)


def calibrate(model) -> None:
    """Expert choice's inference thresholds from a few training-mode forwards (as training sets them)."""
    model.train()
    with torch.no_grad():
        for _ in range(4):
            model(torch.randn(8, 1, 8, 8), torch.randint(0, 100, (8,)), torch.randint(0, 10, (8,)))
    model.eval()


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """get(name) -> (name, checkpoint, pipeline folder) for a model of MODELS: a random-weight export,
    exported again as a pipeline; made once per module."""
    made = {}

    def get(name):
        if name not in made:
            overrides, objective = MODELS[name]
            torch.manual_seed(0)
            model = tiny_model(in_channels=1, **overrides)
            if overrides.get("router") == "expert-choice":
                calibrate(model)
            folder = tmp_path_factory.mktemp(name)
            ckpt = save_export(folder / "model.safetensors", model.config, model.state_dict(), objective=objective)
            made[name] = name, ckpt, export_pipeline(ExportRequest(ckpt, folder / "pipeline"))
        return made[name]

    return get


@pytest.fixture(params=list(MODELS))
def exported(request, exports):
    return exports(request.param)


def offline_pipeline(folder) -> DiffusionPipeline:
    return DiffusionPipeline.from_pretrained(str(folder), trust_remote_code=True)


def generators(seeds):
    return [torch.Generator().manual_seed(seed) for seed in seeds]


def sample_py_images(ckpt, sampler, steps, cfg_scale) -> np.ndarray:
    """sample.py's images (uint8 NHWC) for LABELS and SEEDS: the prepare step and sample_images."""
    options = SamplingOptions(sampler=sampler, num_steps=steps, cfg_scale=cfg_scale)
    prepared = prepare_sampling(SamplingRequest(ckpt, vae_path="none", options=options, device="cpu"))
    return to_uint8_nhwc(prepared.sample(LABELS, SEEDS))


def pipeline_images(pipe, steps, cfg_scale) -> np.ndarray:
    """The pipeline's images as uint8 NHWC, mapped from [0, 1] as sample.py maps [-1, 1]."""
    images = pipe(
        LABELS, num_inference_steps=steps, guidance_scale=cfg_scale, generator=generators(SEEDS), output_type="pt"
    )
    return to_uint8_nhwc(images.images * 2 - 1)


def assert_within_one_level(ours, reference):
    difference = np.abs(ours.astype(np.int16) - reference.astype(np.int16))
    assert difference.max() <= 1, f"{int((difference > 1).sum())} pixels differ by more than 1/255"
    assert reference.std() > 10, "the reference images are flat; the comparison would say nothing"


def test_transformer_output_equals_load_model_forward(exported, no_network):
    name, ckpt, folder = exported
    pipe = offline_pipeline(folder)
    reference = load_model(ckpt)
    assert type(pipe).__name__ == "DiTMoEPipeline" and type(pipe.transformer).__name__ == "DiTMoETransformer2DModel"
    assert pipe.transformer.dit_config.to_dict() == reference.config.to_dict()
    x = torch.randn(4, 1, 8, 8)
    t = torch.tensor([999, 500, 3, 0]) if name.endswith("iddpm") else torch.tensor([1000.0, 731.5, 20.0, 0.0])
    y = torch.tensor([0, 9, 10, 4])  # 10: the null class guidance uses
    with torch.no_grad():
        assert torch.equal(pipe.transformer(x, t, y).sample, reference(x, t, y))


def test_pipeline_images_equal_sample_py(exported, no_network):
    """Flow: Euler (FlowMatchEulerDiscreteScheduler); IDDPM: DDPM with learned sigma (DDPMScheduler,
    per-sample noise at every step from the same generators); both guided at 1.5."""
    name, ckpt, folder = exported
    pipe = offline_pipeline(folder)
    sampler, steps = ("euler", 6) if name.endswith("flow") else ("ddpm", 12)
    expected = FlowMatchEulerDiscreteScheduler if sampler == "euler" else DDPMScheduler
    assert type(pipe.scheduler) is expected
    assert_within_one_level(pipeline_images(pipe, steps, 1.5), sample_py_images(ckpt, sampler, steps, 1.5))


@pytest.mark.parametrize("name", [name for name in MODELS if name.endswith("iddpm")])
def test_ddim_swapped_in_from_config_equals_sample_py_ddim(name, exports, no_network):
    """`pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)` is sample.py's DDIM where the two
    walk the same timesteps: every training step (diffusers' DDIM steps to t - T/N, IDDPM's respacing
    rounds a T-1 / (N-1) stride, so for N < T they differ; docs/diffusers.md)."""
    name, ckpt, folder = exports(name)
    pipe = offline_pipeline(folder)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    steps = pipe.scheduler.config.num_train_timesteps
    assert_within_one_level(pipeline_images(pipe, steps, 1.5), sample_py_images(ckpt, "ddim", steps, 1.5))


def test_unguided_and_three_channel_guidance_follow_sample_py(exports, no_network):
    """guidance_scale 1 is one conditional forward per step; guidance_channels is SamplingOptions.cfg_channels."""
    name, ckpt, folder = exports("topk-flow")
    pipe = offline_pipeline(folder)
    assert_within_one_level(pipeline_images(pipe, 4, 1.0), sample_py_images(ckpt, "euler", 4, 1.0))
    calls = []
    pipe.transformer.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    pipe(LABELS, num_inference_steps=4, guidance_scale=1.0, generator=generators(SEEDS), output_type="np")
    assert calls == [len(LABELS)] * 4


@pytest.mark.parametrize(("total", "steps"), [(1000, 250), (1000, 50), (1000, 7), (100, 12), (100, 100), (4000, 333)])
def test_respaced_timesteps_are_iddpms(total, steps):
    assert iddpm_respaced_timesteps(total, steps) == sorted(space_timesteps(total, str(steps)), reverse=True)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("total", [1000, 100])
def test_ddpm_scheduler_has_the_training_schedule(schedule, total):
    scheduler = scheduler_for(ObjectiveConfig(noise_schedule=schedule, diffusion_steps=total), learn_sigma=True)
    ours = create_diffusion(timestep_respacing="", noise_schedule=schedule, diffusion_steps=total, learn_sigma=True)
    np.testing.assert_allclose(scheduler.alphas_cumprod.double().numpy(), ours.alphas_cumprod, rtol=2e-5, atol=1e-7)
    assert scheduler.config.variance_type == "learned_range" and not scheduler.config.clip_sample


def test_folder_layout_and_shipped_code(tmp_path, no_network):
    """diffusers' folder layout; the shipped modules import no dit_moe; weights sharded above the limit."""
    torch.manual_seed(0)
    model = tiny_model(in_channels=1, num_experts=4, num_experts_per_tok=2)
    ckpt = save_export(tmp_path / "m.safetensors", model.config, model.state_dict(), objective=ObjectiveConfig("flow"))
    folder = export_pipeline(ExportRequest(ckpt, tmp_path / "pipe", max_shard_size="2MB"))
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_dit_moe", "DiTMoEPipeline"]
    assert index["transformer"] == ["modeling_dit_moe", "DiTMoETransformer2DModel"]
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    assert index["vae"] == [None, None] and index["objective"] == "flow"
    assert index["id2label"]["7"] == "7, seven"
    for code in (folder / "pipeline_dit_moe.py", folder / "transformer" / "modeling_dit_moe.py"):
        text = code.read_text()
        assert "import dit_moe" not in text and "from dit_moe" not in text and "\nfrom ." not in text
    shards = sorted((folder / "transformer").glob("diffusion_pytorch_model-*.safetensors"))
    weight_map = json.loads((folder / "transformer" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert len(shards) > 1 and set(weight_map["weight_map"].values()) == {p.name for p in shards}
    pipe = offline_pipeline(folder)
    assert pipe.get_label_ids(["seven", "0"]) == [7, 0]
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([0.5, 0.1]), torch.tensor([1, 2])
    with torch.no_grad():
        assert torch.equal(pipe.transformer(x, t, y).sample, load_model(ckpt)(x, t, y))


def test_installed_classes_load_the_folder_without_remote_code(exports, no_network, monkeypatch):
    """load_pipeline builds the same pipeline from dit_moe's classes; diffusers' remote code stays off."""
    name, ckpt, folder = exports("dense-iddpm")
    monkeypatch.setattr("diffusers.utils.dynamic_modules_utils.get_class_from_dynamic_module", None)
    pipe = load_pipeline(folder)
    assert type(pipe) is DiTMoEPipeline and type(pipe.transformer) is DiTMoETransformer2DModel
    assert_within_one_level(pipeline_images(pipe, 12, 1.5), sample_py_images(ckpt, "ddpm", 12, 1.5))


@pytest.mark.parametrize("name", ["dense-iddpm", "topk-flow"])
def test_other_schedulers_swap_in_and_sample(name, exports, no_network):
    """A scheduler taken from the exported config samples: DPMSolver++ for IDDPM (eps only), flow's Euler with shift."""
    name, ckpt, folder = exports(name)
    pipe = offline_pipeline(folder)
    if name == "dense-iddpm":
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, variance_type=None)
    else:
        pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift=3.0)
    images = pipe(
        LABELS, num_inference_steps=5, guidance_scale=1.5, generator=generators(SEEDS), output_type="np"
    ).images
    assert images.shape == (3, 8, 8, 1) and np.isfinite(images).all()


def test_cli_exports_and_stops_on_bad_input_with_one_line(tmp_path, capsys):
    torch.manual_seed(0)
    model = tiny_model(in_channels=1, num_experts=4, num_experts_per_tok=2)
    # records no objective, and a DiT-MoE layout does not show one
    ckpt = save_export(tmp_path / "m.safetensors", model.config, model.state_dict())
    out = tmp_path / "pipe"
    with pytest.raises(SystemExit) as stop:
        export_main(["export", "--ckpt", str(ckpt), "--out", str(out)])
    error = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and "--objective" in error and "\n" not in error and not out.exists()
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("keep me")
    with pytest.raises(SystemExit):
        export_main(["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "busy"), "--objective", "iddpm"])
    assert "non-empty folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        export_main(
            ["export", "--ckpt", str(ckpt), "--out", str(tmp_path / "busy" / "notes.txt"), "--objective", "flow"]
        )
    assert "is a file" in capsys.readouterr().err
    assert export_main(["export", "--ckpt", str(ckpt), "--out", str(out), "--objective", "iddpm"]) == 0
    assert "trust_remote_code=True" in capsys.readouterr().out
    assert json.loads((out / "model_index.json").read_text())["objective"] == "iddpm"
    assert export_main(["export", "--ckpt", str(ckpt), "--out", str(out), "--objective", "flow"]) == 0  # replaces it
    assert json.loads((out / "model_index.json").read_text())["objective"] == "flow"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.fixture
def quickstart_export(quickstart_run):
    """The quickstart's recipe trained briefly (the suite's shared run, tests/conftest.py)."""
    return quickstart_run / "export.safetensors"


@pytest.mark.slow
def test_quickstart_pipeline_scores_digits_as_sample_py(quickstart_export, tmp_path, no_network):
    """Exported with the command line, loaded offline: the digits classifier recognises the pipeline's
    samples as often as sample.py's (Euler, 25 steps, guidance 1.5, the same seeds)."""
    folder = tmp_path / "pipeline"
    assert export_main(["export", "--ckpt", str(quickstart_export), "--out", str(folder)]) == 0
    pipe = offline_pipeline(folder)
    labels = [i % 10 for i in range(DIGITS_SAMPLES)]
    seeds = list(range(DIGITS_SAMPLES))
    images = pipe(labels, num_inference_steps=25, guidance_scale=1.5, generator=generators(seeds), output_type="pt")
    options = SamplingOptions(sampler="euler", num_steps=25, cfg_scale=1.5)
    prepared = prepare_sampling(SamplingRequest(quickstart_export, vae_path="none", options=options, device="cpu"))
    reference = prepared.sample(labels, seeds)
    scorer = DigitsScorer.fit(seed=0, cache_dir=tmp_path)
    ours, theirs = scorer.score(images.images * 2 - 1, labels), scorer.score(reference, labels)
    assert theirs["label_accuracy"] > 0.3, "the short training did not learn digits; the comparison would say nothing"
    assert abs(ours["label_accuracy"] - theirs["label_accuracy"]) <= 0.01


def test_taylorseer_cache_skips_attention_and_removes_cleanly(exports, no_network):
    """diffusers' TaylorSeer cache on the attention layers (the MoE feed-forward is recomputed every step):
    attention runs on fewer steps, images stay near the uncached ones, and disable_cache restores them exactly."""
    name, ckpt, folder = exports("topk-flow")
    pipe = offline_pipeline(folder)
    steps = 12
    uncached = pipeline_images(pipe, steps, 1.5)
    attention_calls = []
    for block in pipe.transformer.dit.blocks:
        block.attn.qkv.register_forward_hook(lambda module, args, output: attention_calls.append(1))
    config = TaylorSeerCacheConfig(
        cache_interval=3,
        disable_cache_before_step=3,
        cache_identifiers=[r"dit\.blocks\.\d+\.attn"],
        taylor_factors_dtype=torch.float32,
    )
    pipe.transformer.enable_cache(config)
    cached = pipeline_images(pipe, steps, 1.5)
    depth = len(pipe.transformer.dit.blocks)
    assert depth * 3 <= len(attention_calls) <= depth * steps // 2  # 3 warm-up steps, then every third
    assert np.abs(cached.astype(float) - uncached).mean() < 8
    pipe.transformer.disable_cache()
    assert np.array_equal(pipeline_images(pipe, steps, 1.5), uncached)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="model CPU offload moves weights to an accelerator")
def test_model_cpu_offload_gives_the_same_images(exports, no_network):
    pytest.importorskip("accelerate", reason="diffusers' enable_model_cpu_offload needs accelerate")
    name, ckpt, folder = exports("topk-flow")
    pipe = offline_pipeline(folder).to("cuda")
    on_gpu = pipeline_images(pipe, 4, 1.5)
    pipe = offline_pipeline(folder)
    pipe.enable_model_cpu_offload()
    assert np.abs(pipeline_images(pipe, 4, 1.5).astype(int) - on_gpu).max() <= 1
    assert pipe.transformer.device.type == "cpu"


def test_latent_model_ships_its_vae_and_dit_three_channel_guidance(tmp_path, no_network):
    """A 4-channel latent IDDPM model exported with its AutoencoderKL and DiT's 3-channel guidance:
    the folder holds the VAE at dit-moe's latent scale, and the images are sample.py's with the
    same VAE and --cfg-channels 3."""
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 32),
        latent_channels=4,
        layers_per_block=1,
        sample_size=16,
    )
    vae.save_pretrained(tmp_path / "vae")
    torch.manual_seed(0)
    model = tiny_model(in_channels=4, num_experts=4, num_experts_per_tok=2)
    objective = ObjectiveConfig(objective="iddpm", diffusion_steps=100)
    ckpt = save_export(tmp_path / "m.safetensors", model.config, model.state_dict(), objective=objective)
    request = ExportRequest(ckpt, tmp_path / "pipe", vae_path=str(tmp_path / "vae"), guidance_channels=3)
    pipe = offline_pipeline(export_pipeline(request))
    assert type(pipe.vae) is AutoencoderKL and pipe.vae.config.scaling_factor == SD_VAE_SCALE_FACTOR
    images = pipe(LABELS, num_inference_steps=10, guidance_scale=4.0, generator=generators(SEEDS), output_type="pt")
    assert images.images.shape == (3, 3, 16, 16)
    options = SamplingOptions(sampler="ddpm", num_steps=10, cfg_scale=4.0, cfg_channels=3)
    sampling = SamplingRequest(ckpt, vae_path=str(tmp_path / "vae"), options=options, device="cpu")
    reference = to_uint8_nhwc(prepare_sampling(sampling).sample(LABELS, SEEDS))
    assert_within_one_level(to_uint8_nhwc(images.images * 2 - 1), reference)


def test_class_names_by_class_count_and_from_a_file(tmp_path, monkeypatch):
    """Digits' names for 10 classes; ImageNet's from diffusers' DiT release (its model_index.json), and
    none with a warning when it cannot be had; a JSON file for anything else, checked against the classes."""
    from dit_moe.diffusers import labels

    release = tmp_path / "model_index.json"
    release.write_text(json.dumps({"id2label": {str(i): f"class {i}" for i in range(1000)}}))
    monkeypatch.setattr("huggingface_hub.hf_hub_download", lambda repo, name: str(release))
    assert labels.class_names(None, 1000)[999] == "class 999"
    assert labels.class_names(None, 10)[9] == "9, nine" and labels.class_names("none", 10) is None

    def offline(repo, name):
        raise OSError("no network")

    monkeypatch.setattr("huggingface_hub.hf_hub_download", offline)
    assert labels.class_names(None, 1000) is None and labels.class_names(None, 7) is None
    names = tmp_path / "names.json"
    names.write_text(json.dumps(["cat", "dog"]))
    assert labels.class_names(str(names), 2) == {0: "cat", 1: "dog"}
    with pytest.raises(UserError, match="outside the model's 0..0"):
        labels.class_names(str(names), 1)


def _official_dit_file(folder):
    """facebookresearch/DiT's released layout: a plain state dict, no config (architecture and IDDPM inferred)."""
    model = tiny_model(in_channels=4, num_experts=0)
    torch.save(model.state_dict(), folder / "DiT-tiny.pt")
    return folder / "DiT-tiny.pt", None


def _dit_moe_release_file(folder):
    """feizc/DiT-MoE's layout: per-expert keys in train.py's container; it records no objective."""
    model = tiny_model(in_channels=4, num_experts=4, num_experts_per_tok=2)
    state = dit_moe_layout(model.state_dict())
    torch.save({"model": state, "ema": state}, folder / "dit_moe_tiny.pt")
    return folder / "dit_moe_tiny.pt", "iddpm"


FORMATS = {
    "official-dit": _official_dit_file,
    "dit-moe-release": _dit_moe_release_file,
    "old-export-pt": lambda folder: (FIXTURES / "export_v0_dense_iddpm.pt", None),
    "old-export-safetensors": lambda folder: (FIXTURES / "export_v0_moe_flow.safetensors", None),
    "deepspeed-checkpoints": lambda folder: (FIXTURES / "checkpoints_v0", None),
}


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_every_checkpoint_format_exports_and_round_trips(fmt, tmp_path, no_network):
    """Each format load_model reads exports to a folder whose transformer computes load_model's forward
    exactly; latent models get a VAE folder (here a tiny AutoencoderKL standing in for sd-vae-ft-mse)."""
    torch.manual_seed(0)
    ckpt, objective = FORMATS[fmt](tmp_path)
    reference = load_model(ckpt)
    config = reference.config
    vae_path = None
    if config.in_channels == 4:
        vae_path = str(tmp_path / "vae")
        AutoencoderKL(block_out_channels=(32,), latent_channels=4, layers_per_block=1).save_pretrained(vae_path)
    folder = export_pipeline(ExportRequest(ckpt, tmp_path / "pipe", vae_path=vae_path, objective=objective))
    pipe = offline_pipeline(folder)
    x = torch.randn(2, config.in_channels, config.input_size, config.input_size)
    t = torch.tensor([10, 900]) if pipe.config.objective == "iddpm" else torch.tensor([0.25, 0.75])
    y = torch.tensor([0, config.num_classes])
    with torch.no_grad():
        assert torch.equal(pipe.transformer(x, t, y).sample, reference(x, t, y))


def test_half_precision_transformer_samples_near_fp32(exports, no_network):
    """torch_dtype=bfloat16 runs the transformer in bf16 while the scheduler steps in fp32."""
    name, ckpt, folder = exports("topk-flow")
    full = pipeline_images(offline_pipeline(folder), 6, 1.5)
    half_pipe = DiffusionPipeline.from_pretrained(str(folder), trust_remote_code=True, torch_dtype=torch.bfloat16)
    assert half_pipe.transformer.dtype == torch.bfloat16
    half = pipeline_images(half_pipe, 6, 1.5)
    assert np.abs(half.astype(float) - full).mean() < 8
