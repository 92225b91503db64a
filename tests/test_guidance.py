"""Classifier-free guidance wrapper: forwards counted, formula checked channel by channel."""

import pytest
import torch

from dit_moe.diffusion import build_objective, guided

from tiny_dit import tiny_model

NULL = 10


class CountingModel:
    """A label-dependent learn_sigma model that records every forward's batch."""

    def __init__(self, out_channels):
        self.out_channels = out_channels
        self.calls = []

    def __call__(self, x, t, y):
        self.calls.append((x.shape[0], y.clone()))
        y_term = y.float().view(-1, 1, 1, 1) * torch.arange(1, self.out_channels + 1).float().view(1, -1, 1, 1)
        return x.repeat(1, self.out_channels // x.shape[1], 1, 1) * 0.5 + y_term + t.float().view(-1, 1, 1, 1)


def inputs():
    x = torch.randn(3, 4, 2, 2)
    return x, torch.full((3,), 7), torch.tensor([1, 2, 3])


def test_scale_one_is_the_conditional_model_with_one_forward():
    model = CountingModel(8)
    fn = guided(model, 1.0, NULL)
    x, t, y = inputs()
    assert torch.equal(fn(x, t, y), CountingModel(8)(x, t, y))
    assert [batch for batch, _ in model.calls] == [3]


def test_guidance_on_the_prediction_half_with_learned_sigma():
    model = CountingModel(8)
    x, t, y = inputs()
    out = guided(model, 4.0, NULL)(x, t, y=y)
    assert len(model.calls) == 1 and model.calls[0][0] == 6
    assert torch.equal(model.calls[0][1], torch.tensor([1, 2, 3, NULL, NULL, NULL]))
    cond, uncond = CountingModel(8)(x, t, y), CountingModel(8)(x, t, torch.full_like(y, NULL))
    assert torch.allclose(out[:, :4], uncond[:, :4] + 4.0 * (cond[:, :4] - uncond[:, :4]))
    assert torch.equal(out[:, 4:], cond[:, 4:])  # variance channels pass through from the conditional branch


def test_dit_variant_guides_only_the_first_three_channels():
    x, t, y = inputs()
    out = guided(CountingModel(8), 1.5, NULL, cfg_channels=3)(x, t, y)
    cond, uncond = CountingModel(8)(x, t, y), CountingModel(8)(x, t, torch.full_like(y, NULL))
    assert torch.allclose(out[:, :3], uncond[:, :3] + 1.5 * (cond[:, :3] - uncond[:, :3]))
    assert torch.equal(out[:, 3:], cond[:, 3:])


def test_guidance_without_learned_sigma_guides_every_channel():
    x, t, y = inputs()
    out = guided(CountingModel(4), 2.0, NULL)(x, t, y)
    cond, uncond = CountingModel(4)(x, t, y), CountingModel(4)(x, t, torch.full_like(y, NULL))
    assert torch.allclose(out, uncond + 2.0 * (cond - uncond))


@pytest.mark.parametrize("objective, sampler", [("iddpm", "ddim"), ("flow", "euler")])
def test_guided_sampling_runs_one_batched_forward_per_evaluation(objective, sampler):
    model = CountingModel(8)
    x, _, y = inputs()
    obj = build_objective(objective)
    obj.sample(guided(model, 3.0, NULL), x, dict(y=y), sampler=sampler, num_steps=4)
    assert [batch for batch, _ in model.calls] == [6] * 4


def dit_forward_with_cfg(model, x, t, y, cfg_scale):
    """facebookresearch/DiT's `DiT.forward_with_cfg` (models.py), restated: the batch is [cond; uncond]
    halves of one input; only the first three output channels are guided, the rest stay per half."""
    half = x[: len(x) // 2]
    model_out = model(torch.cat([half, half], dim=0), t, y)
    eps, rest = model_out[:, :3], model_out[:, 3:]
    cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
    half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
    return torch.cat([torch.cat([half_eps, half_eps], dim=0), rest], dim=1)


def test_cfg_channels_3_reproduces_dit_forward_with_cfg():
    model = tiny_model(in_channels=4, learn_sigma=True)  # eps channel 3 is left unguided by DiT
    null = model.config.num_classes
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10, 700]), torch.tensor([1, 7])
    batch = torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, null)])
    with torch.no_grad():
        expected = dit_forward_with_cfg(model, *batch, cfg_scale=4.0)
        torch.testing.assert_close(model.forward_with_cfg(*batch, cfg_scale=4.0), expected)
        ours = guided(model, 4.0, null_label=null, cfg_channels=3)(x, t, y)
        torch.testing.assert_close(ours, expected[:2])  # DiT's sample.py keeps the conditional half
        every_channel = guided(model, 4.0, null_label=null)(x, t, y)
    assert (every_channel[:, 3] - expected[:2, 3]).abs().max() > 1e-3  # so guiding channel 3 would fail above
