"""Timestep samplers against their formulas: SpeeDiT, SpeeD, P2 and change-aware weights, dual sampling,
loss-second-moment, flow."""

import math

import numpy as np
import pytest
import torch

from dit_moe.diffusion import (
    LogitNormalTimesteps,
    LossSecondMomentTimesteps,
    SpeeDiTTimesteps,
    UniformFlowTimesteps,
    UniformIndexTimesteps,
    build_objective,
    create_diffusion,
)
from dit_moe.diffusion.config import ObjectiveConfig
from dit_moe.diffusion.timesteps import SpeeDTimesteps


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
    drawn, dual = t[: batch // 2 + 1], t[batch // 2 + 1 :]
    tau = sampler.meaningful_step
    expected_dual = [tau - d if d < tau else d - tau for d in drawn.tolist()][: len(dual)]
    assert dual.tolist() == expected_dual
    assert ((t >= 0) & (t < 1000)).all()
    # P2 with k = gamma = 1: 1 / (1 + snr) = 1 - alpha_bar
    p2 = torch.tensor([1 - alphas_cumprod[i] for i in t.tolist()], dtype=torch.float64)
    assert torch.allclose(weights.double(), p2, rtol=1e-6)
    gamma_two = SpeeDiTTimesteps(alphas_cumprod, p2_k=0.5, p2_gamma=2.0)
    snr = alphas_cumprod[300] / (1 - alphas_cumprod[300])
    assert float(gamma_two.weights[300]) == pytest.approx(1 / (0.5 + snr) ** 2, rel=1e-12)
    assert sampler.weight_target == "mse"


def test_speedit_rejects_a_schedule_without_a_flat_tail():
    with pytest.raises(ValueError, match="SpeeDiT"):
        SpeeDiTTimesteps(np.linspace(0.99, 0.01, 50))


# SpeeD as NUS-HPC-AI-Lab/SpeeD f5650f9 runs it (speed/diffusion/speed/__init__.py, Speed_IDDPM with
# sampling and weighting "ours"): p[t] = k / (k tau + T - tau) below tau, 1 / (k tau + T - tau) from tau on;
# w[t] = (1 - lam) + (2 lam - 1) (d[t] - min d) / (max d - min d) below tau, 1 from tau on,
# d = np.gradient(1 - alpha_bar); the dual half pivots on the meaningful step, as SpeeDiT's does.

# A hand-made 8-step process: g = np.gradient(sqrt(1 - alpha_bar)) first falls under 1e-4 at t = 6
# (g[5] = (sqrt(1 - 1e-7) - sqrt(0.99)) / 2 ~ 2.5e-3, g[6] = (sqrt(1 - 1e-8) - sqrt(1 - 1e-6)) / 2 ~ 2.5e-7).
SMALL_ALPHAS = [0.9, 0.5, 0.2, 0.05, 0.01, 1e-6, 1e-7, 1e-8]


def hand_change_aware_weights(alphas, lam, tau):
    d = hand_gradient([1 - a for a in alphas])
    lo, hi = min(d), max(d)
    return [(1 - lam) + (2 * lam - 1) * (d[t] - lo) / (hi - lo) if t < tau else 1.0 for t in range(len(alphas))]


def test_speed_small_process_probabilities_boundary_and_weights():
    sampler = SpeeDTimesteps(np.array(SMALL_ALPHAS), k=5, lam=0.6, tau=5)
    grad = hand_gradient([math.sqrt(1 - a) for a in SMALL_ALPHAS])
    assert sampler.meaningful_step == next(i for i, g in enumerate(grad) if g < 1e-4) + 1 == 7
    assert torch.allclose(sampler.probs, torch.tensor([5 / 28] * 5 + [1 / 28] * 3, dtype=torch.float64), rtol=1e-12)
    # d = [0.4, 0.35, 0.225, 0.095, 0.0249995, ...], max 0.4 at t = 0, min 9e-8 at t = 7
    expected = torch.tensor(hand_change_aware_weights(SMALL_ALPHAS, 0.6, 5), dtype=torch.float64)
    assert torch.allclose(sampler.weights, expected, rtol=1e-12)
    assert float(sampler.weights[0]) == pytest.approx(0.6, rel=1e-12)  # the ceiling lam at the fastest change
    assert float(sampler.weights[3]) == pytest.approx(0.4 + 0.2 * (0.095 - 9e-8) / (0.4 - 9e-8), rel=1e-9)
    assert sampler.weights[5:].tolist() == [1.0, 1.0, 1.0]
    assert sampler.weight_target == "mse"


def test_speed_default_constants_on_the_linear_schedule(alphas_cumprod):
    sampler = SpeeDTimesteps(alphas_cumprod)
    assert (sampler.tau, sampler.meaningful_step) == (700, 642)
    norm = 5 * 700 + 300
    assert torch.allclose(sampler.probs[:700], torch.full((700,), 5 / norm, dtype=torch.float64), rtol=1e-12)
    assert torch.allclose(sampler.probs[700:], torch.full((300,), 1 / norm, dtype=torch.float64), rtol=1e-12)
    expected = torch.tensor(hand_change_aware_weights(list(alphas_cumprod), 0.6, 700), dtype=torch.float64)
    assert torch.allclose(sampler.weights, expected, rtol=1e-12)
    assert float(sampler.weights[:700].max()) == pytest.approx(0.6) and float(sampler.weights[:700].min()) > 0.4


def test_speed_seeded_frequencies_dual_half_and_weights():
    sampler = SpeeDTimesteps(np.array(SMALL_ALPHAS), k=5, lam=0.6, tau=5)
    batch = 40001
    with torch.random.fork_rng():
        torch.manual_seed(0)
        t, weights = sampler.sample(batch, "cpu")
    drawn, dual = t[: batch // 2 + 1], t[batch // 2 + 1 :]
    freq = torch.bincount(drawn, minlength=8).double() / len(drawn)
    assert torch.allclose(freq, torch.tensor([5 / 28] * 5 + [1 / 28] * 3, dtype=torch.float64), atol=0.01)
    assert dual.tolist() == [7 - d if d < 7 else d - 7 for d in drawn.tolist()][: len(dual)]
    hand = hand_change_aware_weights(SMALL_ALPHAS, 0.6, 5)
    assert torch.allclose(weights.double(), torch.tensor([hand[i] for i in t.tolist()], dtype=torch.float64), rtol=1e-6)


def test_speed_seeded_frequencies_on_the_linear_schedule(alphas_cumprod):
    sampler = SpeeDTimesteps(alphas_cumprod)
    batch = 40001
    with torch.random.fork_rng():
        torch.manual_seed(1)
        t, _ = sampler.sample(batch, "cpu")
    drawn = t[: batch // 2 + 1]
    assert (drawn < 700).double().mean().item() == pytest.approx(3500 / 3800, abs=0.01)
    assert ((t >= 0) & (t < 1000)).all()


def test_speed_differs_from_speedit(alphas_cumprod):
    speed, speedit = SpeeDTimesteps(alphas_cumprod), SpeeDiTTimesteps(alphas_cumprod)
    # SpeeDiT's favoured steps end at the meaningful step 642, SpeeD's at tau = 700
    assert float(speedit.probs[650] / speedit.probs[10]) == pytest.approx(0.2, rel=1e-6)
    assert float(speed.probs[650] / speed.probs[10]) == 1.0
    # P2 at t = 0 is 1 - alpha_bar_0 = beta_0 = 1e-4; SpeeD's change-aware weight stays in [0.4, 0.6]
    assert float(speedit.weights[0]) == pytest.approx(1e-4, rel=1e-9)
    assert 0.4 < float(speed.weights[0]) < 0.6
    assert not torch.allclose(speed.probs, speedit.probs) and not torch.allclose(speed.weights, speedit.weights)


def test_speed_builds_by_name_and_is_a_valid_config():
    objective = build_objective("iddpm", timestep_sampler="speed")
    assert isinstance(objective.timesteps, SpeeDTimesteps) and objective.timesteps.meaningful_step == 642
    options = ObjectiveConfig(timestep_sampler="speed").build_options(learn_sigma=True)
    assert options["timestep_sampler"] == "speed"
    assert isinstance(build_objective("iddpm", **options).timesteps, SpeeDTimesteps)
    with pytest.raises(ValueError, match="does not fit the flow objective"):
        ObjectiveConfig(objective="flow", timestep_sampler="speed")


def test_speed_rejects_a_boundary_outside_the_process_and_a_schedule_without_a_flat_tail():
    with pytest.raises(ValueError, match="tau=700"):
        SpeeDTimesteps(np.array(SMALL_ALPHAS))
    with pytest.raises(ValueError, match="SpeeD needs"):
        SpeeDTimesteps(np.linspace(0.99, 0.01, 50), tau=25)


def test_uniform_discrete():
    t, w = UniformIndexTimesteps(1000).sample(50000, "cpu")
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
    t, _ = UniformFlowTimesteps().sample(50000, "cpu")
    assert t.min() >= 0 and t.max() < 1 and abs(t.mean().item() - 0.5) < 0.006
