"""Gaussian diffusion against closed forms: schedules, q, posterior, vb terms, respacing, DDPM/DDIM.

The sampler tests use data x0 ~ N(mu, s^2) per channel, whose exact eps predictor and
exact reverse-step variance are analytic, so a correct sampler must land on N(mu, s^2).
"""

import math

import numpy as np
import pytest
import torch

from dit_moe.diffusion import create_diffusion, space_timesteps
from dit_moe.diffusion.likelihood import discretized_gaussian_log_likelihood, normal_kl

MU = torch.tensor([0.5, -0.3]).view(1, 2, 1, 1)
S = torch.tensor([0.6, 0.4]).view(1, 2, 1, 1)


def hand_linear_alphas_cumprod(steps):
    betas = [1e-4 + i * (0.02 - 1e-4) / (steps - 1) for i in range(steps)]
    return betas, [math.prod(1 - b for b in betas[: i + 1]) for i in range(steps)]


def cos_alpha_bar(s):
    return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2


# ---------------------------------------------------------------- schedules


def test_linear_schedule_endpoints():
    d = create_diffusion("", noise_schedule="linear")
    _, abar = hand_linear_alphas_cumprod(1000)
    assert d.alphas_cumprod[0] == pytest.approx(1 - 1e-4, rel=1e-12)
    assert d.alphas_cumprod[-1] == pytest.approx(abar[-1], rel=1e-9)
    assert d.alphas_cumprod[-1] == pytest.approx(4.0358e-5, rel=1e-3)


def test_linear_schedule_scales_with_step_count():
    d = create_diffusion("", noise_schedule="linear", diffusion_steps=100)
    assert d.betas[0] == pytest.approx(1e-3) and d.betas[-1] == pytest.approx(0.2)


def test_cosine_schedule_follows_alpha_bar_and_caps_beta():
    d = create_diffusion("", noise_schedule="cosine")
    T = 1000
    assert d.alphas_cumprod[0] == pytest.approx(cos_alpha_bar(1 / T) / cos_alpha_bar(0), rel=1e-9)
    assert d.alphas_cumprod[T // 2 - 1] == pytest.approx(cos_alpha_bar(0.5) / cos_alpha_bar(0), rel=1e-9)
    assert d.alphas_cumprod[T - 2] == pytest.approx(cos_alpha_bar((T - 1) / T) / cos_alpha_bar(0), rel=1e-9)
    # the last beta is capped at 0.999, so alpha_bar drops by exactly 1000x
    assert d.betas[-1] == pytest.approx(0.999, rel=1e-6)
    assert d.alphas_cumprod[-1] == pytest.approx(d.alphas_cumprod[-2] * 0.001, rel=1e-6)
    assert create_diffusion("", noise_schedule="squaredcos_cap_v2").alphas_cumprod[7] == d.alphas_cumprod[7]


def test_unknown_schedule_is_a_clear_error():
    with pytest.raises(ValueError, match="noise schedule"):
        create_diffusion("", noise_schedule="sqrt")


# ---------------------------------------------------------------- forward process and posterior


def test_q_sample_moments_over_many_draws():
    d = create_diffusion("")
    x0 = torch.tensor([0.7, -1.2, 0.1]).view(1, 3, 1, 1).expand(40000, 3, 1, 1)
    t = torch.full((40000,), 300)
    xt = d.q_sample(x0, t)
    abar = d.alphas_cumprod[300]
    assert torch.allclose(xt.mean(0).flatten(), math.sqrt(abar) * x0[0].flatten(), atol=0.02)
    assert torch.allclose(xt.var(0).flatten(), torch.full((3,), 1 - abar), rtol=0.03)
    mean, var, log_var = d.q_mean_variance(x0[:2], t[:2])
    assert torch.allclose(mean, math.sqrt(abar) * x0[:2]) and torch.allclose(var, torch.full_like(var, 1 - abar))
    assert torch.allclose(log_var, torch.full_like(var, math.log(1 - abar)))


def test_posterior_matches_product_of_gaussians():
    """q(x_{t-1}|x_t,x_0) ∝ N(x_t; sqrt(a_t) x_{t-1}, b_t) N(x_{t-1}; sqrt(abar_{t-1}) x_0, 1 - abar_{t-1})."""
    d = create_diffusion("", diffusion_steps=100)
    betas = [0.001 + i * (0.2 - 0.001) / 99 for i in range(100)]
    x0 = torch.tensor([[0.3], [-0.8]]).view(2, 1, 1, 1)
    xt = torch.tensor([[1.1], [0.4]]).view(2, 1, 1, 1)
    for step in (1, 10, 57, 99):
        abar_prev = math.prod(1 - b for b in betas[:step])
        precision = (1 - betas[step]) / betas[step] + 1 / (1 - abar_prev)
        var = 1 / precision
        mean = var * (math.sqrt(1 - betas[step]) * xt / betas[step] + math.sqrt(abar_prev) * x0 / (1 - abar_prev))
        got_mean, got_var, got_log_var = d.q_posterior_mean_variance(x0, xt, torch.full((2,), step))
        assert torch.allclose(got_mean, mean.float(), rtol=1e-5, atol=1e-6)
        assert torch.allclose(got_var, torch.full_like(got_var, var), rtol=1e-5)
        assert torch.allclose(got_log_var, torch.full_like(got_var, math.log(var)), rtol=1e-5)
    # beta_tilde_0 = 0: the log variance is clipped to log beta_tilde_1
    _, var0, log_var0 = d.q_posterior_mean_variance(x0, xt, torch.zeros(2, dtype=torch.long))
    assert float(var0[0]) == 0.0 and float(log_var0[0]) == pytest.approx(math.log(d.posterior_variance[1]), rel=1e-6)


def test_learned_range_variance_interpolates_log_betas():
    d = create_diffusion("", learn_sigma=True)
    x = torch.zeros(3, 1, 1, 1)
    t = torch.tensor([0, 20, 900])
    v = torch.tensor([0.5, -1.0, 1.0]).view(3, 1, 1, 1)
    out = d.p_mean_variance_from_output(torch.cat([torch.zeros_like(x), v], dim=1), x, t, clip_denoised=False)
    beta_tilde = lambda k: d.betas[k] * (1 - d.alphas_cumprod[k - 1]) / (1 - d.alphas_cumprod[k])
    expected = [
        0.75 * math.log(d.betas[0]) + 0.25 * math.log(beta_tilde(1)),  # t = 0 uses the clipped beta_tilde_1
        math.log(beta_tilde(20)),
        math.log(d.betas[900]),
    ]
    assert torch.allclose(out["log_variance"].flatten(), torch.tensor(expected, dtype=torch.float32), rtol=1e-6)
    assert torch.allclose(out["variance"], out["log_variance"].exp())


def test_pred_xstart_from_eps_inverts_q_sample():
    d = create_diffusion("")
    x0, eps = torch.randn(4, 2, 3, 3), torch.randn(4, 2, 3, 3)
    t = torch.tensor([0, 1, 500, 999])
    xt = d.q_sample(x0, t, noise=eps)
    assert torch.allclose(d.predict_xstart_from_eps(xt, t, eps), x0, atol=2e-3)
    assert torch.allclose(d.predict_eps_from_xstart(xt, t, x0), eps, atol=2e-3)


# ---------------------------------------------------------------- likelihood terms (DiT's formulas)


def test_normal_kl_against_hand_formula():
    m1, lv1, m2, lv2 = 0.3, math.log(0.5), -0.2, math.log(2.0)
    hand = math.log(math.sqrt(2.0) / math.sqrt(0.5)) + (0.5 + (m1 - m2) ** 2) / (2 * 2.0) - 0.5
    got = normal_kl(torch.tensor(m1, dtype=torch.float64), lv1, m2, lv2)
    assert float(got) == pytest.approx(hand, rel=1e-12)
    p = torch.distributions.Normal(torch.tensor(m1), math.sqrt(0.5))
    q = torch.distributions.Normal(torch.tensor(m2), math.sqrt(2.0))
    assert float(got) == pytest.approx(float(torch.distributions.kl_divergence(p, q)), rel=1e-5)


def _approx_cdf(x):
    return 0.5 * (1 + math.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def _exact_cdf(x):
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def _log_bin(x, mean, std, cdf):
    """log P(x's 8-bit bin) under N(mean, std^2); the end bins reach to -inf / +inf."""
    upper, lower = cdf((x - mean + 1 / 255) / std), cdf((x - mean - 1 / 255) / std)
    if x < -0.999:
        return math.log(upper)
    if x > 0.999:
        return math.log(1 - lower)
    return math.log(upper - lower)


@pytest.mark.parametrize("x, mean, std", [(0.2, 0.1, 0.05), (-1.0, -0.9, 0.2), (1.0, 0.95, 0.03), (0.0, 0.4, 0.3)])
def test_discretized_gaussian_log_likelihood_against_hand(x, mean, std):
    as_t = lambda v: torch.tensor([v], dtype=torch.float64)
    got = float(discretized_gaussian_log_likelihood(as_t(x), means=as_t(mean), log_scales=as_t(math.log(std))))
    assert got == pytest.approx(_log_bin(x, mean, std, _approx_cdf), rel=1e-9)
    assert got == pytest.approx(_log_bin(x, mean, std, _exact_cdf), rel=2e-2)  # tanh CDF: DiT's approximation of Phi


# ---------------------------------------------------------------- training losses


def _fixed_output_model(output):
    return lambda x, t, **kwargs: output


def test_training_losses_hybrid_terms_against_hand_computation():
    d = create_diffusion("", learn_sigma=True)
    x0 = torch.tensor([0.2, -0.5, 0.9, -1.0]).view(2, 2, 1, 1).double()  # -1.0: the open end bin
    noise = torch.tensor([0.3, -1.1, 0.4, 0.8]).view(2, 2, 1, 1).double()
    eps_pred = torch.tensor([0.1, -0.9, 0.0, 1.0]).view(2, 2, 1, 1).double()
    v = torch.tensor([0.2, -0.4, 0.7, 0.0]).view(2, 2, 1, 1).double()
    t = torch.tensor([123, 0])
    terms = d.training_losses(_fixed_output_model(torch.cat([eps_pred, v], 1)), x0, t, noise=noise)
    assert set(terms) == {"loss", "mse", "vb"}
    assert torch.allclose(terms["mse"], ((noise - eps_pred) ** 2).mean((1, 2, 3)))
    assert torch.allclose(terms["loss"], terms["mse"] + terms["vb"])

    def hand_vb(i, k):
        ab, ab_prev, beta = d.alphas_cumprod[k], (d.alphas_cumprod[k - 1] if k > 0 else 1.0), d.betas[k]
        c1, c2 = beta * math.sqrt(ab_prev) / (1 - ab), (1 - ab_prev) * math.sqrt(1 - beta) / (1 - ab)
        log_post = math.log(d.posterior_variance[max(k, 1)])
        total = 0.0
        for c in range(2):
            x0c, n, e, vc = (float(a[i, c]) for a in (x0, noise, eps_pred, v))
            xt = math.sqrt(ab) * x0c + math.sqrt(1 - ab) * n
            pred_x0 = (xt - math.sqrt(1 - ab) * e) / math.sqrt(ab)
            model_mean = c1 * pred_x0 + c2 * xt
            model_log_var = (vc + 1) / 2 * math.log(beta) + (1 - (vc + 1) / 2) * log_post
            if k == 0:
                total += -_log_bin(x0c, model_mean, math.exp(0.5 * model_log_var), _approx_cdf)
            else:
                true_mean = c1 * x0c + c2 * xt
                var_ratio = math.exp(log_post - model_log_var)
                total += 0.5 * (
                    -1 + model_log_var - log_post + var_ratio + (true_mean - model_mean) ** 2 * math.exp(-model_log_var)
                )
        return total / 2 / math.log(2)

    assert float(terms["vb"][0]) == pytest.approx(hand_vb(0, 123), rel=1e-4)
    assert float(terms["vb"][1]) == pytest.approx(hand_vb(1, 0), rel=1e-4)


def test_vb_gradient_does_not_reach_the_mean():
    d = create_diffusion("", learn_sigma=True)
    x0 = torch.randn(3, 2, 2, 2)
    eps_part = torch.randn(3, 2, 2, 2, requires_grad=True)
    var_part = torch.zeros(3, 2, 2, 2, requires_grad=True)
    model = lambda x, t, **kw: torch.cat([eps_part, var_part], dim=1)
    terms = d.training_losses(model, x0, torch.tensor([5, 400, 900]))
    assert all(torch.isfinite(terms[k]).all() for k in ("loss", "mse", "vb"))
    eps_grad, var_grad = torch.autograd.grad(terms["vb"].sum(), [eps_part, var_part], allow_unused=True)
    assert eps_grad is None or torch.count_nonzero(eps_grad) == 0
    assert torch.count_nonzero(var_grad) > 0
    eps_grad, var_grad = torch.autograd.grad(terms["mse"].sum(), [eps_part, var_part], allow_unused=True)
    assert torch.count_nonzero(eps_grad) > 0 and (var_grad is None or torch.count_nonzero(var_grad) == 0)


def test_rescaled_vb_and_kl_loss_types():
    x0, noise = torch.randn(2, 1, 2, 2), torch.randn(2, 1, 2, 2)
    output = torch.cat([torch.randn(2, 1, 2, 2), torch.rand(2, 1, 2, 2) * 2 - 1], 1)
    t = torch.tensor([3, 100])
    plain = create_diffusion("250").training_losses(_fixed_output_model(output), x0, t, noise=noise)
    rescaled = create_diffusion("250", rescale_learned_sigmas=True).training_losses(
        _fixed_output_model(output), x0, t, noise=noise
    )
    assert torch.allclose(rescaled["vb"], plain["vb"] * 0.25)
    assert torch.allclose(rescaled["mse"], plain["mse"])
    kl = create_diffusion("250", use_kl=True).training_losses(_fixed_output_model(output), x0, t, noise=noise)
    assert set(kl) == {"loss"} and torch.allclose(kl["loss"], plain["vb"] * 250)


def test_fixed_variance_and_xstart_prediction():
    x0, noise = torch.randn(2, 1, 2, 2), torch.randn(2, 1, 2, 2)
    out = torch.randn(2, 1, 2, 2)
    t = torch.tensor([0, 600])
    terms = create_diffusion("", learn_sigma=False, predict_xstart=True).training_losses(
        _fixed_output_model(out), x0, t, noise=noise
    )
    assert set(terms) == {"loss", "mse"} and torch.allclose(terms["loss"], ((x0 - out) ** 2).mean((1, 2, 3)))
    large = create_diffusion("", learn_sigma=False).p_mean_variance_from_output(out, x0, t)
    small = create_diffusion("", learn_sigma=False, sigma_small=True).p_mean_variance_from_output(out, x0, t)
    d = create_diffusion("")
    assert float(large["variance"][1, 0, 0, 0]) == pytest.approx(d.betas[600], rel=1e-6)
    assert float(large["variance"][0, 0, 0, 0]) == pytest.approx(d.posterior_variance[1], rel=1e-6)
    assert float(small["variance"][1, 0, 0, 0]) == pytest.approx(d.posterior_variance[600], rel=1e-6)


def test_wrong_output_channels_is_a_clear_error():
    d = create_diffusion("", learn_sigma=True)
    with pytest.raises(ValueError, match="learn_sigma"):
        d.training_losses(_fixed_output_model(torch.zeros(2, 1, 2, 2)), torch.zeros(2, 1, 2, 2), torch.tensor([1, 2]))


# ---------------------------------------------------------------- respacing


def test_space_timesteps_ddim_and_sections():
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    steps = space_timesteps(1000, "250")
    assert len(steps) == 250 and steps[0] == 0 and steps[-1] == 999
    assert steps == sorted({round(k * 999 / 249) for k in range(250)})
    sections = space_timesteps(300, "10,15,20")
    assert len(sections) == 45
    assert [sum(lo <= s < lo + 100 for s in sections) for lo in (0, 100, 200)] == [10, 15, 20]
    assert sections[:2] == [0, 11] and sections[-1] == 299
    with pytest.raises(ValueError, match="integer stride"):
        space_timesteps(1000, "ddim999")
    with pytest.raises(ValueError, match="cannot take"):
        space_timesteps(10, "20")


def test_respaced_process_keeps_alpha_bar_and_maps_model_timesteps():
    full = create_diffusion("")
    spaced = create_diffusion("ddim50")
    assert spaced.num_timesteps == 50
    assert np.allclose(spaced.alphas_cumprod, full.alphas_cumprod[::20], rtol=1e-12)
    seen = []

    def model(x, t, **kw):
        seen.append(t.tolist())
        return torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:])

    spaced.p_sample_loop(model, (2, 1, 1, 1), torch.randn(2, 1, 1, 1), clip_denoised=False, progress=True)
    assert seen == [[k, k] for k in range(980, -1, -20)]
    seen.clear()
    spaced.training_losses(model, torch.zeros(2, 1, 1, 1), torch.tensor([1, 49]))
    assert seen == [[20, 980]]
    assert create_diffusion("ddim50", rescale_timesteps=True, diffusion_steps=500).model_timesteps(
        torch.tensor([1])
    ).tolist() == [20.0]


# ---------------------------------------------------------------- samplers on Gaussian data


def exact_model(diffusion):
    """The exact eps predictor and reverse-step variance for x0 ~ N(MU, S^2), as a learn_sigma model.

    It is called with original timesteps (one per call, as samplers do) and looks up the
    respaced index k itself, so a sampler that passed the respaced index would fail here.
    """
    original_abar = np.cumprod(1 - diffusion.original_betas)

    def model(x, t, y=None):
        (timestep,) = t.unique().tolist()
        (k,) = np.flatnonzero(diffusion.timestep_map == timestep)
        a, b = math.sqrt(original_abar[timestep]), math.sqrt(1 - original_abar[timestep])
        var_xt = a**2 * S**2 + b**2
        eps = b * (x - a * MU) / var_xt
        # Var(x_{k-1} | x_k) = beta_tilde_k + coef1_k^2 Var(x_0 | x_k), mapped to IDDPM's v in [-1, 1]
        true_var = diffusion.posterior_variance[k] + diffusion.posterior_mean_coef1[k] ** 2 * S**2 * b**2 / var_xt
        lo, hi = diffusion.posterior_log_variance_clipped[k], math.log(diffusion.betas[k])
        v = (2 * (true_var.log() - lo) / (hi - lo) - 1).clamp(-1, 1)
        return torch.cat([eps, v.expand_as(eps)], dim=1)

    return model


def test_ddpm_lands_on_the_data_distribution():
    d = create_diffusion("50")
    noise = torch.randn(20000, 2, 1, 1)
    x = d.p_sample_loop(exact_model(d), noise.shape, noise, clip_denoised=False, model_kwargs={})
    assert torch.allclose(x.mean((0, 2, 3)), MU.flatten(), atol=0.015)
    assert torch.allclose(x.std((0, 2, 3)), S.flatten(), atol=0.015)


def ddim_closed_form(diffusion, noise):
    """DDIM (eta = 0) with the exact eps on Gaussian data, by hand: each step rescales the
    standardised coordinate z_k = (x_k - a_k mu) / sigma_k by (a' a s^2 + b' b) / (sigma sigma')."""
    abar = np.cumprod(1 - diffusion.original_betas)[diffusion.timestep_map]
    s2 = (S**2).double()
    sigma = lambda ab: torch.sqrt(ab * s2 + 1 - ab)
    z = (noise.double() - math.sqrt(abar[-1]) * MU) / sigma(abar[-1])
    for k in range(len(abar) - 1, -1, -1):
        ab, ab_prev = abar[k], (abar[k - 1] if k > 0 else 1.0)
        z = z * (math.sqrt(ab_prev * ab) * s2 + math.sqrt((1 - ab_prev) * (1 - ab))) / (sigma(ab) * sigma(ab_prev))
    return MU + torch.sqrt(s2) * z


def test_ddim_matches_its_closed_form_and_the_ode_solution():
    noise = torch.randn(2000, 2, 1, 1)
    d = create_diffusion("ddim50")
    x = d.ddim_sample_loop(exact_model(d), noise.shape, noise, clip_denoised=False, model_kwargs={}, eta=0.0)
    assert torch.allclose(x.double(), ddim_closed_form(d, noise), atol=2e-4)
    # with every step DDIM follows the probability-flow ODE, which maps noise to MU + S * z_T
    full = create_diffusion("")
    few = noise[:64]
    x = full.ddim_sample_loop(exact_model(full), few.shape, few, clip_denoised=False)
    a_T = math.sqrt(full.alphas_cumprod[-1])
    ode = MU + S * (few - a_T * MU) / torch.sqrt(a_T**2 * S**2 + 1 - a_T**2)
    assert torch.allclose(x, ode, atol=0.01)


def test_ddim_with_eta_one_is_the_ddpm_posterior_step():
    """DDIM eq. 16 with eta = 1 gives sigma^2 = beta_tilde_t and the DDPM posterior mean (Song et al. 2021)."""
    ddim_process = create_diffusion("50")
    ddpm_process = create_diffusion("50", learn_sigma=False, sigma_small=True)
    x, t = torch.randn(4, 2, 1, 1), torch.full((4,), 30)
    eps_model = lambda x, t, **kw: exact_model(ddim_process)(x, t)[:, :2]
    full_model = exact_model(ddim_process)
    torch.manual_seed(7)
    via_ddim = ddim_process.ddim_sample(full_model, x, t, clip_denoised=False, eta=1.0)["sample"]
    torch.manual_seed(7)
    via_ddpm = ddpm_process.p_sample(eps_model, x, t, clip_denoised=False)["sample"]
    assert torch.allclose(via_ddim, via_ddpm, atol=1e-5)


def test_last_step_adds_no_noise():
    d = create_diffusion("50")
    model = exact_model(d)
    x = torch.randn(4, 2, 1, 1)
    for sample_step in (d.p_sample, d.ddim_sample):
        last = sample_step(model, x, torch.zeros(4, dtype=torch.long), clip_denoised=False)
        mean = d.p_mean_variance(model, x, torch.zeros(4, dtype=torch.long), clip_denoised=False)["pred_xstart"]
        assert torch.allclose(last["sample"], mean, atol=1e-6)  # at t = 0 the posterior mean is the x_0 prediction
    step_30 = torch.full((4,), 30)
    assert not torch.allclose(d.p_sample(model, x, step_30)["sample"], d.p_sample(model, x, step_30)["sample"])
