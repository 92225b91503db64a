"""Per-sample step noise: stochastic samplers give a sample the same image in any batch."""

import pytest
import torch

from dit_moe.data.vae import PixelCodec
from dit_moe.diffusion import ObjectiveConfig, create_diffusion
from dit_moe.sampling import (
    SamplingOptions,
    StackedRandomGenerator,
    build_sampling_objective,
    per_sample_noise,
    sample_images,
)

from tiny_dit import tiny_model


@pytest.fixture(scope="module")
def iddpm_model():
    torch.manual_seed(0)
    return tiny_model(in_channels=3)


def test_stacked_generator_rows_depend_only_on_their_seed():
    together, alone = StackedRandomGenerator([3, 4, 5]), StackedRandomGenerator([5])
    torch.testing.assert_close(together.randn((2, 4))[2:], alone.randn((2, 4)), rtol=0, atol=0)
    x = torch.zeros(3, 2, 4)
    torch.testing.assert_close(together.randn_like(x)[2:], alone.randn_like(x[:1]), rtol=0, atol=0)
    torch.testing.assert_close(StackedRandomGenerator([7]).randn((2, 4)), per_sample_noise([7], (2, 4)), rtol=0, atol=0)
    with pytest.raises(ValueError, match="2 samples for 3 generators"):
        together.randn_like(x[:2])


def test_gaussian_loops_draw_step_noise_from_noise_fn():
    diffusion = create_diffusion("4", learn_sigma=False)
    model = lambda x, t, **_: torch.zeros_like(x)  # noqa: E731 - a constant eps model
    x_T = torch.randn(2, 1, 2, 2)
    calls = []

    def zeros(x):
        calls.append(x.shape)
        return torch.zeros_like(x)

    noiseless = diffusion.p_sample_loop(model, x_T.shape, x_T, noise_fn=zeros)
    assert len(calls) == 4 and calls[0] == x_T.shape
    mean_only = diffusion.ddim_sample_loop(model, x_T.shape, x_T, eta=1.0, noise_fn=zeros)
    assert len(calls) == 8
    torch.manual_seed(1)
    default = diffusion.p_sample_loop(model, x_T.shape, x_T)  # torch.randn_like, as before noise_fn existed
    assert not torch.allclose(default, noiseless) and torch.isfinite(mean_only).all()


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_sample_is_the_same_in_a_batch_of_one_and_of_four(iddpm_model, sampler):
    options = SamplingOptions(sampler=sampler, num_steps=3, cfg_scale=1.5)
    iddpm = build_sampling_objective(iddpm_model.config, ObjectiveConfig())
    labels, seeds = [1, 2, 3, 4], [10, 11, 12, 13]
    batch = sample_images(iddpm_model, PixelCodec(3), labels, seeds, options, objective=iddpm)
    for i in (0, 3):
        alone = sample_images(iddpm_model, PixelCodec(3), labels[i : i + 1], seeds[i : i + 1], options, objective=iddpm)
        torch.testing.assert_close(batch[i : i + 1], alone, atol=1e-4, rtol=0)  # batched kernels round differently
    again = sample_images(iddpm_model, PixelCodec(3), labels, seeds, options, objective=iddpm)
    torch.testing.assert_close(batch, again, atol=0, rtol=0)
    other = sample_images(iddpm_model, PixelCodec(3), labels, [20, 21, 22, 23], options, objective=iddpm)
    assert (other - batch).abs().amax(dim=(1, 2, 3)).min() > 1e-3
