"""The Objective interface: factory, per-sample weighted losses, sampler dispatch, callbacks, errors."""

import pytest
import torch

from dit_moe.diffusion import GaussianDiffusion, RectifiedFlow, build_objective, create_diffusion
from dit_moe.diffusion.timesteps import LossSecondMomentTimesteps


def net(out_channels=4):
    """A small label- and time-dependent model; tanh keeps learned-variance values in [-1, 1]."""
    conv = torch.nn.Conv2d(2, out_channels, 1)
    return lambda x, t, y: torch.tanh(conv(x) + y.float().view(-1, 1, 1, 1) * 0.01 + t.float().view(-1, 1, 1, 1) * 1e-3)


def test_build_objective_options_and_errors():
    iddpm = build_objective("iddpm", noise_schedule="cosine", diffusion_steps=100, learn_sigma=False)
    assert iddpm.name == "iddpm" and isinstance(iddpm.process, GaussianDiffusion) and iddpm.process.num_timesteps == 100
    with pytest.raises(ValueError, match="SpeeDiT needs"):
        build_objective("iddpm", noise_schedule="cosine", diffusion_steps=100, timestep_sampler="speedit")
    flow = build_objective("flow", learn_sigma=False, t_scale=1000.0, timestep_sampler="uniform")
    assert flow.name == "flow" and isinstance(flow.process, RectifiedFlow)
    assert flow.process.t_scale == 1000.0 and not flow.process.learn_sigma
    with pytest.raises(ValueError, match="unknown objective"):
        build_objective("edm")
    with pytest.raises(ValueError, match="no option"):
        build_objective("flow", noise_schedule="linear")
    with pytest.raises(ValueError, match="timestep sampler"):
        build_objective("flow", timestep_sampler="speedit")


def test_iddpm_loss_equals_training_losses_at_the_drawn_timesteps():
    objective = build_objective("iddpm")
    model, x0, y = net(), torch.randn(5, 2, 3, 3), torch.arange(5)
    noise = torch.randn_like(x0)
    terms = objective.loss(model, x0, dict(y=y), noise=noise)
    assert set(terms) == {"loss", "mse", "vb", "t"} and terms["loss"].shape == (5,)
    reference = create_diffusion("").training_losses(model, x0, terms["t"], dict(y=y), noise=noise)
    assert torch.allclose(terms["loss"], reference["loss"]) and torch.allclose(terms["vb"], reference["vb"])


def test_caller_drawn_timesteps_and_weights_are_used():
    objective = build_objective("flow")
    x0, noise = torch.randn(3, 2, 2, 2), torch.randn(3, 2, 2, 2)
    t, weights = torch.tensor([0.1, 0.5, 0.9]), torch.tensor([1.0, 2.0, 0.5])
    terms = objective.loss(net(), x0, dict(y=torch.arange(3)), noise=noise, timesteps=(t, weights))
    assert torch.equal(terms["t"], t) and torch.allclose(terms["loss"], weights * terms["mse"])


def test_speedit_weights_apply_to_the_mse_term_only():
    objective = build_objective("iddpm", timestep_sampler="speedit")
    terms = objective.loss(net(), torch.randn(6, 2, 2, 2), dict(y=torch.arange(6)))
    p2 = torch.tensor(1 - objective.process.alphas_cumprod[terms["t"].numpy()], dtype=torch.float32)
    assert torch.allclose(terms["loss"], p2 * terms["mse"] + terms["vb"], rtol=1e-5)


def test_loss_second_moment_weights_the_whole_loss_and_learns():
    objective = build_objective(
        "iddpm", diffusion_steps=4, noise_schedule="cosine", timestep_sampler="loss-second-moment"
    )
    sampler = objective.timesteps
    assert isinstance(sampler, LossSecondMomentTimesteps)
    for _ in range(30):
        objective.loss(net(), torch.randn(8, 2, 2, 2), dict(y=torch.arange(8)))
    assert (sampler.loss_counts == sampler.history).all()
    p = torch.tensor(sampler.probabilities())
    terms = objective.loss(net(), torch.randn(8, 2, 2, 2), dict(y=torch.arange(8)))
    unweighted = terms["mse"] + terms["vb"]
    weights = terms["loss"] / unweighted
    assert torch.allclose(weights.double(), 1 / (4 * p[terms["t"]]), rtol=1e-4)


def test_flow_loss_by_hand():
    objective = build_objective("flow", t_scale=1000.0)
    model, x0, y = net(), torch.randn(4, 2, 2, 2), torch.arange(4)
    noise = torch.randn_like(x0)
    terms = objective.loss(model, x0, dict(y=y), noise=noise)
    t = terms["t"].view(-1, 1, 1, 1)
    x_t = (1 - t) * x0 + t * noise
    v = model(x_t, terms["t"] * 1000.0, y)[:, :2]
    assert set(terms) == {"loss", "mse", "t"}
    assert torch.allclose(terms["loss"], ((noise - x0 - v) ** 2).mean((1, 2, 3)), atol=1e-6)
    assert ((terms["t"] > 0) & (terms["t"] < 1)).all()


def test_sampler_that_does_not_fit_is_a_clear_error():
    x, kwargs = torch.randn(2, 2, 2, 2), dict(y=torch.arange(2))
    with pytest.raises(
        ValueError,
        match=r"^euler on an IDDPM model: use ddpm or ddim or dpm\+\+2m or dpm\+\+3m or dpm\+\+2m-sde or unipc or deis$",
    ):
        build_objective("iddpm").sample(net(), x, kwargs, sampler="euler")
    with pytest.raises(
        ValueError,
        match=r"^ddim on a rectified-flow model: use euler or heun or dpm\+\+2m or dpm\+\+3m or dpm\+\+2m-sde or unipc or deis$",
    ):
        build_objective("flow").sample(net(), x, kwargs, sampler="ddim")
    with pytest.raises(ValueError, match="unknown sampler"):
        build_objective("flow").sample(net(), x, kwargs, sampler="dpm++")


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_iddpm_sampling_respaces_and_calls_back_with_original_timesteps(sampler):
    steps = []
    objective = build_objective("iddpm")
    out = objective.sample(
        net(),
        torch.randn(2, 2, 2, 2),
        dict(y=torch.arange(2)),
        sampler=sampler,
        num_steps=5,
        progress=True,
        callback=lambda info: steps.append((info["step"], info["num_steps"], info["t"])),
    )
    assert out.shape == (2, 2, 2, 2) and torch.isfinite(out).all()
    assert steps == [(0, 5, 999), (1, 5, 749), (2, 5, 500), (3, 5, 250), (4, 5, 0)]


def test_default_samplers_and_step_counts():
    calls = []
    model = lambda x, t, y: calls.append(1) or torch.zeros(x.shape[0], 4, *x.shape[2:])
    build_objective("flow").sample(model, torch.randn(1, 2, 1, 1), dict(y=torch.zeros(1, dtype=torch.long)))
    assert len(calls) == 50  # euler, 50 steps
    calls.clear()
    build_objective("iddpm").sample(model, torch.randn(1, 2, 1, 1), dict(y=torch.zeros(1, dtype=torch.long)))
    assert len(calls) == 250  # ddpm, 250 steps as DiT's sample.py
