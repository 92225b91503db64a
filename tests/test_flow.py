"""Rectified flow: path, target, loss, t_scale, and Euler/Heun against the exact ODE solution.

For data x0 ~ N(MU, S^2) the exact velocity is analytic and the flow ODE maps the noise
z at t = 1 to MU + S z at t = 0, sample by sample.
"""

import pytest
import torch

from dit_moe.diffusion import RectifiedFlow, euler, heun

MU = torch.tensor([0.5, -0.3]).view(1, 2, 1, 1)
S = torch.tensor([0.6, 0.4]).view(1, 2, 1, 1)


def exact_velocity(x, t, y=None):
    """E[eps - x0 | x_t] for x0 ~ N(MU, S^2), plus C junk variance channels (a learn_sigma model)."""
    t = t.view(-1, 1, 1, 1)
    var_xt = (1 - t) ** 2 * S**2 + t**2
    v = (t - (1 - t) * S**2) * (x - (1 - t) * MU) / var_xt - MU
    return torch.cat([v, torch.full_like(v, 1e3)], dim=1)


def test_path_target_and_loss_by_hand():
    flow = RectifiedFlow(learn_sigma=True)
    x0, noise = torch.randn(3, 2, 2, 2), torch.randn(3, 2, 2, 2)
    t = torch.tensor([0.0, 0.25, 1.0])
    xt = flow.interpolate(x0, noise, t)
    assert torch.allclose(xt[0], x0[0]) and torch.allclose(xt[2], noise[2])
    assert torch.allclose(xt[1], 0.75 * x0[1] + 0.25 * noise[1])
    assert torch.equal(flow.target(x0, noise), noise - x0)
    pred = torch.randn(3, 2, 2, 2)
    model = lambda x, t, **kw: torch.cat([pred, torch.randn_like(pred)], dim=1)
    terms = flow.training_losses(model, x0, t, noise=noise)
    assert torch.allclose(terms["mse"], ((noise - x0 - pred) ** 2).mean((1, 2, 3)))
    assert torch.equal(terms["loss"], terms["mse"])


def test_exact_velocity_has_the_smallest_loss():
    flow = RectifiedFlow()
    x0 = MU + S * torch.randn(4096, 2, 1, 1)
    t = torch.rand(4096)
    noise = torch.randn_like(x0)
    best = flow.training_losses(exact_velocity, x0, t, noise=noise)["mse"].mean()
    shifted = lambda x, t, **kw: exact_velocity(x, t) + 0.1
    assert best < flow.training_losses(shifted, x0, t, noise=noise)["mse"].mean() - 0.005


@pytest.mark.parametrize("t_scale", [1.0, 1000.0])
def test_model_sees_t_times_t_scale(t_scale):
    seen = []

    def model(x, t, y):
        seen.append(t.clone())
        return torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:])

    flow = RectifiedFlow(learn_sigma=True, t_scale=t_scale)
    flow.training_losses(
        model, torch.zeros(2, 1, 2, 2), torch.tensor([0.1, 0.9]), model_kwargs=dict(y=torch.tensor([0, 1]))
    )
    assert torch.allclose(seen[0], torch.tensor([0.1, 0.9]) * t_scale)
    seen.clear()
    euler(flow, model, torch.zeros(1, 1, 2, 2), model_kwargs=dict(y=torch.tensor([3])), num_steps=4)
    assert torch.allclose(torch.cat(seen), torch.tensor([1.0, 0.75, 0.5, 0.25]) * t_scale)


def test_output_channel_mismatch_is_a_clear_error():
    flow = RectifiedFlow(learn_sigma=False)
    with pytest.raises(ValueError, match="learn_sigma"):
        flow.velocity(lambda x, t: torch.zeros(1, 4, 2, 2), torch.zeros(1, 2, 2, 2), torch.ones(1))


def test_euler_and_heun_follow_the_exact_ode():
    flow = RectifiedFlow(learn_sigma=True)
    z = torch.randn(2048, 2, 1, 1)
    exact = MU + S * z
    err = lambda sampler, n: (sampler(flow, exact_velocity, z, num_steps=n) - exact).abs().max().item()
    euler_20, euler_40 = err(euler, 20), err(euler, 40)
    heun_20, heun_40 = err(heun, 20), err(heun, 40)
    assert heun_20 < 5e-3 and euler_40 < 0.1
    assert 1.7 < euler_20 / euler_40 < 2.3  # first order
    assert heun_20 / heun_40 > 3.0  # second order
    x = heun(flow, exact_velocity, z, num_steps=20)
    assert torch.allclose(x.mean((0, 2, 3)), MU.flatten(), atol=0.05)
    assert torch.allclose(x.std((0, 2, 3)), S.flatten(), atol=0.03)


def test_flow_samplers_call_back_each_step_before_the_model():
    events = []
    model = lambda x, t, **kw: (
        events.append(("model", float(t[0]))) or torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:])
    )
    callback = lambda info: events.append(("step", info["step"], info["num_steps"], info["t"], tuple(info["x"].shape)))
    heun(RectifiedFlow(), model, torch.zeros(2, 1, 1, 1), num_steps=2, callback=callback, progress=True)
    assert events == [
        ("step", 0, 2, 1.0, (2, 1, 1, 1)),
        ("model", 1.0),
        ("model", 0.5),
        ("step", 1, 2, 0.5, (2, 1, 1, 1)),
        ("model", 0.5),
        ("model", 0.0),
    ]
