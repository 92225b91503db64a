"""Timestep samplers against their formulas: SpeeDiT, P2 weights, dual sampling, loss-second-moment, flow."""

import math

import numpy as np
import pytest
import torch

from dit_moe.diffusion import (
    LogitNormalTimesteps,
    LossSecondMomentTimesteps,
    SpeeDiTTimesteps,
    UniformTimesteps,
    UniformTimeTimesteps,
    create_diffusion,
)


@pytest.fixture(scope="module")
def alphas_cumprod():
    return create_diffusion("").alphas_cumprod


def hand_gradient(values):
    """np.gradient by hand: central differences inside, one-sided at the ends."""
    inner = [(values[i + 1] - values[i - 1]) / 2 for i in range(1, len(values) - 1)]
    return [values[1] - values[0], *inner, values[-1] - values[-2]]


def test_speedit_meaningful_step_and_probabilities(alphas_cumprod):
    sampler = SpeeDiTTimesteps(alphas_cumprod)
    grad = hand_gradient([math.sqrt(1 - a) for a in alphas_cumprod])
    first_flat = next(i for i, g in enumerate(grad) if g < 1e-4)
    assert sampler.meaningful_step == first_flat + 1 == 642  # linear schedule, T = 1000
    unnormalised = [math.tanh(1e6 * (g - 1e-4)) + 1.5 for g in grad]
    expected = torch.tensor(unnormalised, dtype=torch.float64) / sum(unnormalised)
    assert torch.allclose(sampler.probs, expected, rtol=1e-9)
    # away from the threshold the steps before tau are 5x as likely as those after
    assert float(sampler.probs[10] / sampler.probs[900]) == pytest.approx(5.0, rel=1e-6)


def test_speedit_empirical_frequencies_match_the_formula(alphas_cumprod):
    sampler = SpeeDiTTimesteps(alphas_cumprod)
    batch = 40001
    t, _ = sampler.sample(batch, "cpu")
    drawn = t[: batch // 2 + 1]
    counts = torch.bincount(drawn, minlength=1000).double().view(10, 100).sum(1)
    expected = sampler.probs.view(10, 100).sum(1) * len(drawn)
    assert (counts - expected).abs().max() < 4 * expected.sqrt().max()


def test_speedit_dual_half_and_p2_weights(alphas_cumprod):
    sampler = SpeeDiTTimesteps(alphas_cumprod)
    batch = 9
    t, weights = sampler.sample(batch, "cpu")
    drawn, dual = t[: batch // 2 + 1], t[batch // 2 + 1:]
    tau = sampler.meaningful_step
    expected_dual = [tau - d if d < tau else d - tau for d in drawn.tolist()][: len(dual)]
    assert dual.tolist() == expected_dual
    assert ((t >= 0) & (t < 1000)).all()
    # P2 with k = gamma = 1: 1 / (1 + snr) = 1 - alpha_bar
    assert torch.allclose(weights.double(), torch.tensor([1 - alphas_cumprod[i] for i in t.tolist()], dtype=torch.float64), rtol=1e-6)
    gamma_two = SpeeDiTTimesteps(alphas_cumprod, p2_k=0.5, p2_gamma=2.0)
    snr = alphas_cumprod[300] / (1 - alphas_cumprod[300])
    assert float(gamma_two.p2_weights[300]) == pytest.approx(1 / (0.5 + snr) ** 2, rel=1e-12)
    assert sampler.weight_target == "mse"


def test_speedit_rejects_a_schedule_without_a_flat_tail():
    with pytest.raises(ValueError, match="SpeeDiT"):
        SpeeDiTTimesteps(np.linspace(0.99, 0.01, 50))


def test_uniform_discrete():
    t, w = UniformTimesteps(1000).sample(50000, "cpu")
    assert t.min() >= 0 and t.max() <= 999 and torch.equal(w, torch.ones(50000))
    assert abs(t.double().mean().item() - 499.5) < 4 * 288.7 / math.sqrt(50000)


def test_loss_second_moment_resampler():
    sampler = LossSecondMomentTimesteps(num_timesteps=4, history=2, uniform_prob=0.1)
    t, w = sampler.sample(8, "cpu")
    assert torch.equal(w, torch.ones(8))  # uniform until every step has a full history
    sampler.update(torch.tensor([0, 1, 2, 3, 0, 1, 2]), torch.tensor([1.0, 2.0, 3.0, 4.0, 1.0, 2.0, 3.0]))
    assert np.allclose(sampler.probabilities(), 0.25)  # step 3 has one loss so far
    sampler.update(torch.tensor([3, 3]), torch.tensor([0.0, 4.0]))  # history keeps the last 2: [0, 4]
    rms = np.array([1.0, 2.0, 3.0, math.sqrt(8.0)])
    expected = 0.9 * rms / rms.sum() + 0.1 / 4
    assert np.allclose(sampler.probabilities(), expected)
    t, w = sampler.sample(20000, "cpu")
    assert torch.allclose(w.double(), torch.tensor(1 / (4 * expected[t.numpy()])), rtol=1e-6)
    freq = torch.bincount(t, minlength=4).double() / 20000
    assert torch.allclose(freq, torch.tensor(expected), atol=0.015)


def test_flow_time_samplers():
    t, w = LogitNormalTimesteps().sample(50000, "cpu")
    logit = torch.log(t / (1 - t))
    assert abs(logit.mean().item()) < 0.02 and abs(logit.std().item() - 1) < 0.02 and torch.equal(w, torch.ones(50000))
    t, w = LogitNormalTimesteps(mean=0.5, std=0.3).sample(50000, "cpu")
    logit = torch.log(t / (1 - t))
    assert abs(logit.mean().item() - 0.5) < 0.01 and abs(logit.std().item() - 0.3) < 0.01
    t, _ = UniformTimeTimesteps().sample(50000, "cpu")
    assert t.min() >= 0 and t.max() < 1 and abs(t.mean().item() - 0.5) < 0.006
