"""Fewer evaluations at the same images: guidance interval, evaluation counting, routed-expert step caching,
the solvers through the sampling tools (refusals, per-seed reproducibility), sample.py's grid defaults."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from dit_moe.checkpoint import save_export
from dit_moe.data.vae import PixelCodec
from dit_moe.diffusion import ObjectiveConfig, build_objective, guided
from dit_moe.diffusion.guidance import EvaluationCounter, interval, noise_level
from dit_moe.models.flops import block_ffn_flops
from dit_moe.sampling import SampleRun, SamplingOptions, build_sampling_objective, sample_images
from dit_moe.sampling.grid import GridLayout, main, sample_grid
from dit_moe.sampling.step_cache import CacheSpec, ExpertCache
from dit_moe.utils.errors import UserError

from tiny_dit import tiny_model

LOW, HIGH = 0.28, 5.42


@pytest.fixture(scope="module")
def moe():
    return tiny_model(in_channels=3, num_experts=4, num_experts_per_tok=2)


def test_noise_levels_are_edm_sigmas_for_both_objectives():
    flow = build_objective("flow", t_scale=1000.0).process
    t = torch.tensor([0.25, 0.5, 0.8])
    torch.testing.assert_close(noise_level(flow)(t * 1000), (t / (1 - t)).double())
    iddpm = build_objective("iddpm").process
    index = torch.tensor([0, 500, 999])
    abar = torch.as_tensor(iddpm.alphas_cumprod)[index]
    torch.testing.assert_close(noise_level(iddpm)(index), ((1 - abar) / abar).sqrt())


def test_guidance_interval_guides_inside_and_skips_the_unconditional_rows_outside():
    flow = build_objective("flow").process  # t_scale 1: the model sees t itself
    model = EvaluationCounter(lambda x, t, y: x * (1 + t.view(-1, 1, 1, 1)) + y.view(-1, 1, 1, 1).float())
    fn = guided(model, 3.0, null_label=9, guide_at=interval(flow, LOW, HIGH))
    full = guided(model, 3.0, null_label=9)
    x, y = torch.randn(2, 2, 1, 1), torch.tensor([1, 2])
    inside, outside = torch.full((2,), 0.5), torch.full((2,), 0.9)  # sigma 1 and 9
    torch.testing.assert_close(fn(x, inside, y), full(x, inside, y))
    rows = model.rows
    torch.testing.assert_close(fn(x, outside, y), model(x, outside, y))  # the conditional prediction alone
    assert model.rows - rows == 2 + 2  # one conditional forward of 2 rows (plus the direct call above)


def test_interval_cuts_the_counted_evaluations_as_the_schedule_says(moe):
    flow = build_sampling_objective(moe.config, ObjectiveConfig(objective="flow"))
    run = SampleRun()
    options = SamplingOptions(sampler="euler", num_steps=10, cfg_scale=1.5, guidance_interval=(LOW, HIGH))
    sample_images(moe, PixelCodec(3), [1, 2], [0, 1], options, objective=flow, run=run)
    ts = [1 - k / 10 for k in range(10)]
    guided_steps = sum(LOW < (t / (1 - t) if t < 1 else math.inf) <= HIGH for t in ts)
    assert guided_steps == 6 and run.stats.evaluations_per_image == 10 + guided_steps
    assert "16 model evaluations per image" in run.stats.describe()


def test_expert_cache_reuses_routed_outputs_and_counts_the_flops(moe):
    x, t, y = torch.randn(3, 3, 8, 8), torch.full((3,), 0.5), torch.tensor([0, 1, 2])
    plain = moe(x, t, y)
    other = torch.randn(3, 3, 8, 8)
    with ExpertCache(moe, CacheSpec("experts", 2)) as cache:
        first = moe(x, t, y)  # evaluation 0: refresh
        reused = moe(other, t, y)  # evaluation 1: routed outputs of evaluation 0
        again = moe(other, t, y)  # evaluation 2: refresh
    torch.testing.assert_close(first, plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(again, moe(other, t, y), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(reused, again, atol=1e-4)  # the stale experts show
    assert all("forward" not in vars(block.moe) for block in moe.blocks if block.is_moe)  # restored
    config, layers = moe.config, [b.moe for b in moe.blocks if b.is_moe]
    per_layer = block_ffn_flops(config.hidden_size, int(config.hidden_size * config.mlp_ratio), config.moe, 16)
    assert cache.reused == len(layers)
    assert cache.flops_saved == 3 * len(layers) * (per_layer["router"] + per_layer["experts"])


def test_cache_spec_and_dense_models_are_refused_in_one_sentence(tmp_path):
    assert CacheSpec.parse("experts:3") == CacheSpec("experts", 3) and CacheSpec.parse("none") is None
    with pytest.raises(ValueError, match="use experts:N with N >= 2"):
        CacheSpec.parse("blocks:1")
    dense = tiny_model(in_channels=3)
    path = save_export(tmp_path / "dense.safetensors", dense.config, dense.state_dict(), objective=ObjectiveConfig())
    with pytest.raises(
        UserError, match="^--cache experts:2 reuses routed-expert outputs but this checkpoint is a dense"
    ):
        sample_grid(path, tmp_path / "x.png", options=SamplingOptions(cache="experts:2"), device="cpu")


@pytest.mark.parametrize("objective", ["iddpm", "flow"])
@pytest.mark.parametrize("sampler", ["dpm++2m", "unipc", "dpm++2m-sde"])
def test_solvers_sample_per_seed_whatever_the_batch(moe, objective, sampler):
    process = build_sampling_objective(moe.config, ObjectiveConfig(objective=objective))
    options = SamplingOptions(sampler=sampler, num_steps=4, cfg_scale=2.0, guidance_interval=(0.5, 50.0))
    batch = sample_images(moe, PixelCodec(3), [1, 2, 3], [5, 6, 7], options, objective=process)
    alone = sample_images(moe, PixelCodec(3), [3], [7], options, objective=process)
    torch.testing.assert_close(batch[2:], alone, atol=1e-4, rtol=0)
    assert torch.isfinite(batch).all()


def test_grid_defaults_are_readable_and_num_samples_cycles_labels(moe, tmp_path, capsys):
    path = save_export(
        tmp_path / "flow.safetensors", moe.config, moe.state_dict(), objective=ObjectiveConfig(objective="flow")
    )
    grid = sample_grid(
        path,
        tmp_path / "g.png",
        class_labels=[3, 4],
        options=SamplingOptions(sampler="unipc", num_steps=2),
        layout=GridLayout(num_samples=5),
        device="cpu",
    )
    assert grid.labels == [3, 4, 3, 4, 3]
    assert np.asarray(Image.open(grid.path)).shape == (2 * 66 + 2, 4 * 66 + 2, 3)  # 8 px -> 64 px tiles
    every = sample_grid(
        path, tmp_path / "e.png", options=SamplingOptions(num_steps=1), layout=GridLayout(12), device="cpu"
    )
    assert every.labels == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]  # every class, cycled
    argv = ["--ckpt", path, "--out", tmp_path / "h.png", "--sampler", "deis", "--num-sampling-steps", "3"]
    assert main([str(a) for a in argv + ["--guidance-interval", "0.5,inf", "--cache", "experts:2"]]) == 0
    out = capsys.readouterr().out
    assert "deis, 3 steps" in out and "model evaluations per image" in out and "saved by caching" in out
    with pytest.raises(SystemExit):
        main([str(a) for a in argv + ["--guidance-interval", "5,1"]])
    assert "needs 0 <= LO < HI" in capsys.readouterr().err


def test_fid_sampler_resumes_with_an_interval_and_refuses_another(tmp_path):
    from dit_moe.sampling.many import check_settings

    settings = dict(guidance_interval=(LOW, HIGH), cache="experts:2")
    check_settings(tmp_path, settings, write=True)
    check_settings(tmp_path, settings, write=True)  # as stored (JSON lists): the same settings
    with pytest.raises(UserError, match="guidance_interval"):
        check_settings(tmp_path, dict(settings, guidance_interval=(0.5, HIGH)), write=True)
