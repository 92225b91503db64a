"""The diffusers solvers (dpm++2m, dpm++3m, dpm++2m-sde, unipc, deis) on a Gaussian target whose sampling ODE is
solved exactly.

Data x_0 ~ N(mu, s^2) per element. The exact denoiser is linear, so each objective's probability-flow
ODE carries noise z to x_0 = mu + s z (for IDDPM, from the standardised x_T). Every solver's first
step is the first-order DDIM / DPM-Solver++(1) update, written here by hand (Lu et al. 2022, eq. 9 in
data prediction); DPM-Solver++(2M) is also written out in full (Lu et al. 2022, Algorithm 2). The stochastic
SDE-DPM-Solver++(2M) draws noise, so it reaches the target's distribution rather than the ODE's sample: it is
written out in full with the noise it drew, and its samples are checked against N(mu, s^2).
"""

import math

import numpy as np
import pytest
import torch

from dit_moe.diffusion import ObjectiveConfig, build_objective
from dit_moe.diffusion.diffusers_schedulers import (
    SOLVERS,
    STOCHASTIC_SOLVERS,
    build_scheduler,
    model_timestep,
    scheduler_for,
)
from dit_moe.diffusion.samplers import SAMPLERS

MU, S = 0.7, 0.5
T_SCALE = 1000.0  # the flow model below is called with t * 1000, as the quickstart's
GARBAGE = 1e3  # the learned-variance channels: a solver that used them would be far off
ODE_SOLVERS = [name for name in SOLVERS if name not in STOCHASTIC_SOLVERS]


def iddpm_model(process):
    abar = torch.as_tensor(process.alphas_cumprod)

    def model(x, t, y=None):
        a = abar[t.long()].view(-1, 1, 1, 1).to(x.dtype)
        eps = (1 - a).sqrt() * (x - a.sqrt() * MU) / (a * S**2 + 1 - a)
        return torch.cat([eps, torch.full_like(eps, GARBAGE)], dim=1)

    return model


def flow_model(x, t, y=None):
    t = (t / T_SCALE).view(-1, 1, 1, 1).to(x.dtype)
    var = (1 - t) ** 2 * S**2 + t**2
    x0 = MU + (1 - t) * S**2 * (x - (1 - t) * MU) / var
    eps = t * (x - (1 - t) * MU) / var
    return torch.cat([eps - x0, torch.full_like(x0, GARBAGE)], dim=1)


def setup(objective, count=64):
    if objective == "iddpm":
        process = build_objective("iddpm").process
        abar_T = float(process.alphas_cumprod[-1])
        z = torch.randn(count, 2, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        noise = math.sqrt(abar_T) * MU + math.sqrt(abar_T * S**2 + 1 - abar_T) * z
        return process, iddpm_model(process), noise, MU + S * z
    process = build_objective("flow", t_scale=T_SCALE).process
    z = torch.randn(count, 2, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return process, flow_model, z, MU + S * z


def alpha_sigma(objective, process, t):
    """(alpha_t, sigma_t) of x_t = alpha_t x_0 + sigma_t eps at the callback's t (index or flow time)."""
    if objective == "iddpm":
        a = float(process.alphas_cumprod[t])
        return math.sqrt(a), math.sqrt(1 - a)
    return 1 - t, t


def data_prediction(objective, process, model, x, t):
    alpha, sigma = alpha_sigma(objective, process, t)
    if objective == "iddpm":
        eps = model(x, torch.full((x.shape[0],), t))[:, : x.shape[1]]
        return (x - sigma * eps) / alpha
    return x - t * model(x, torch.full((x.shape[0],), t * T_SCALE))[:, : x.shape[1]]


FIRST_ORDER = {"iddpm": "ddim", "flow": "euler"}  # our own first-order samplers of each objective


@pytest.mark.parametrize("objective", ["iddpm", "flow"])
@pytest.mark.parametrize("solver", ODE_SOLVERS)
def test_every_solver_reaches_the_exact_sample(objective, solver):
    process, model, noise, exact = setup(objective)

    def error(sampler, steps):
        x = SAMPLERS[sampler](process, model, noise, num_steps=steps, model_kwargs=dict(y=None))
        return (x - exact).abs().max().item()

    # Higher order than DDIM / Euler: at 40 steps at most half their error, and close to the exact sample
    # (DEIS stops at sigma_min, IDDPM 0.01, flow t = 1e-3, instead of 0 and keeps that much noise).
    ours, first_order = error(solver, 40), error(FIRST_ORDER[objective], 40)
    assert ours < 0.5 * first_order and ours < 3e-2, (ours, first_order)


@pytest.mark.parametrize("objective", ["iddpm", "flow"])
@pytest.mark.parametrize("solver", ODE_SOLVERS)
def test_first_step_of_every_solver_is_the_hand_written_ddim_step(objective, solver):
    process, model, noise, _ = setup(objective)
    seen = []
    SAMPLERS[solver](
        process, model, noise, num_steps=8, callback=lambda info: seen.append((info["t"], info["x"].clone()))
    )
    (t, x), (s, x_next) = seen[0], seen[1]
    alpha_t, sigma_t = alpha_sigma(objective, process, t)
    alpha_s, sigma_s = alpha_sigma(objective, process, s)
    x0 = data_prediction(objective, process, model, x, t)
    hand = sigma_s / sigma_t * x + (alpha_s - alpha_t * sigma_s / sigma_t) * x0  # DDIM in data prediction
    # DEIS works in eps form in float32 (x_0 -> eps -> step), which costs ~1e-4 here
    tolerance = 5e-4 if solver == "deis" else 1e-5
    torch.testing.assert_close(x_next, hand, atol=tolerance, rtol=1e-4)


@pytest.mark.parametrize("objective", ["iddpm", "flow"])
def test_dpm_solver_2m_matches_the_hand_written_algorithm(objective):
    process, model, noise, _ = setup(objective)
    ts = []
    ours = SAMPLERS["dpm++2m"](process, model, noise, num_steps=6, callback=lambda info: ts.append(info["t"]))

    def lam(t):
        alpha, sigma = alpha_sigma(objective, process, t)
        return math.log(alpha / sigma)

    x, previous = noise.clone(), None
    for i, t in enumerate(ts):
        x0 = data_prediction(objective, process, model, x, t)
        last = i == len(ts) - 1
        if last:  # the final step goes to sigma = 0: x_0 is the data prediction (lower_order_final)
            x = x0
            break
        s = ts[i + 1]
        alpha_s, sigma_s = alpha_sigma(objective, process, s)
        h = lam(s) - lam(t)
        d = x0
        if previous is not None:
            r = (lam(t) - lam(previous[0])) / h
            d = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * previous[1]
        x = sigma_s / alpha_sigma(objective, process, t)[1] * x - alpha_s * math.expm1(-h) * d
        previous = (t, x0)
    torch.testing.assert_close(ours, x, atol=1e-5, rtol=1e-5)


class RecordedNoise:
    """A noise_fn drawing from its own seeded generator and keeping what it drew."""

    def __init__(self, seed=1):
        self.generator, self.drawn = torch.Generator().manual_seed(seed), []

    def __call__(self, x):
        self.drawn.append(torch.randn(x.shape, generator=self.generator, dtype=x.dtype))
        return self.drawn[-1]


@pytest.mark.parametrize("objective", ["iddpm", "flow"])
def test_sde_dpm_solver_2m_matches_the_hand_written_algorithm(objective):
    """SDE-DPM-Solver++(2M) (Lu et al. 2022, appendix; the midpoint form): with h = lambda_s - lambda_t,
    x_s = sigma_s / sigma_t e^-h x_t + alpha_s (1 - e^-2h) (D0 + D1 / 2) + sigma_s sqrt(1 - e^-2h) z,
    D0 the data prediction at t and D1 = (D0 - D0_prev) / r, r the previous step's h over this one's."""
    process, model, noise, _ = setup(objective)
    ts, recorded = [], RecordedNoise()
    ours = SAMPLERS["dpm++2m-sde"](
        process, model, noise, num_steps=6, callback=lambda info: ts.append(info["t"]), noise_fn=recorded
    )
    assert len(recorded.drawn) == len(ts)  # one draw per step, from the sample's own generator

    def lam(t):
        alpha, sigma = alpha_sigma(objective, process, t)
        return math.log(alpha / sigma)

    x, previous = noise.clone(), None
    for i, t in enumerate(ts):
        x0 = data_prediction(objective, process, model, x, t)
        if i == len(ts) - 1:  # to sigma = 0: e^-h = 0, no noise survives; x_0 is the data prediction
            x = x0
            break
        s = ts[i + 1]
        sigma_t, (alpha_s, sigma_s) = alpha_sigma(objective, process, t)[1], alpha_sigma(objective, process, s)
        h = lam(s) - lam(t)
        d = x0
        if previous is not None:
            r = (lam(t) - lam(previous[0])) / h
            d = x0 + 0.5 * (x0 - previous[1]) / r
        z = recorded.drawn[i].to(x.dtype)
        x = sigma_s / sigma_t * math.exp(-h) * x + alpha_s * -math.expm1(-2 * h) * d
        x = x + sigma_s * math.sqrt(-math.expm1(-2 * h)) * z
        previous = (t, x0)
    torch.testing.assert_close(ours, x, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("objective", ["iddpm", "flow"])
def test_sde_dpm_solver_2m_samples_the_target_distribution(objective):
    """With the exact denoiser, the reverse SDE's samples are N(mu, s^2) whatever noise it drew; the solver's
    mean and spread land there at 40 steps (4,096 x 8 values: the estimates' own error is ~0.004)."""
    process, model, noise, exact = setup(objective, count=4096)
    x = SAMPLERS["dpm++2m-sde"](process, model, noise, num_steps=40, noise_fn=RecordedNoise())
    assert abs(x.mean().item() - MU) < 0.02 and abs(x.std().item() - S) < 0.02, (x.mean(), x.std())
    assert (x - exact).abs().max() > 0.1  # it is not the ODE's sample: the noise it drew moved it


def test_build_scheduler_maps_both_objectives_for_pipeline_export():
    flow = ObjectiveConfig(objective="flow", flow_t_scale=1.0)
    scheduler = build_scheduler(flow, "unipc")
    scheduler.set_timesteps(4)
    assert scheduler.config.prediction_type == "flow_prediction" and scheduler.config.use_flow_sigmas
    assert model_timestep(flow, scheduler, 1) == pytest.approx(float(scheduler.sigmas[1]))  # t, not sigma x 1000
    iddpm = ObjectiveConfig(objective="iddpm", noise_schedule="cosine", diffusion_steps=500)
    scheduler = build_scheduler(iddpm, "dpm++3m")
    process = build_objective("iddpm", noise_schedule="cosine", diffusion_steps=500).process
    np.testing.assert_allclose(scheduler.betas.numpy(), process.betas, rtol=1e-6)
    assert scheduler.config.solver_order == 3 and scheduler.config.num_train_timesteps == 500
    scheduler.set_timesteps(5)
    assert model_timestep(iddpm, scheduler, 0) == 499.0
    with pytest.raises(ValueError, match="unknown solver"):
        scheduler_for(process, "dpm++")


@pytest.mark.parametrize("solver", SOLVERS)
def test_dit_three_channel_guidance_survives_the_learned_sigma_split(solver):
    """4-channel latents, 8 output channels: guidance on the first 3 eps channels (DiT's forward_with_cfg);
    the 4th comes from the conditional branch, the variance channels from nowhere."""
    from dit_moe.diffusion import guided

    process = build_objective("iddpm").process

    def model(x, t, y):
        eps = x * 0.1 + y.view(-1, 1, 1, 1).float()  # the class shifts eps: guidance shows
        return torch.cat([eps, torch.full_like(eps, GARBAGE)], dim=1)

    noise, y = torch.randn(2, 4, 2, 2), torch.tensor([1, 2])

    def run(fn):  # the same step noise for each run (a stochastic solver draws some)
        return SAMPLERS[solver](process, fn, noise, num_steps=3, model_kwargs=dict(y=y), noise_fn=RecordedNoise())

    three = run(guided(model, 4.0, null_label=0, cfg_channels=3))
    cond, full = run(model), run(guided(model, 4.0, null_label=0))
    torch.testing.assert_close(three[:, 3], cond[:, 3])
    torch.testing.assert_close(three[:, :3], full[:, :3])
    assert not torch.allclose(three[:, :3], cond[:, :3])
