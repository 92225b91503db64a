"""Gaussian diffusion (DDPM / IDDPM) with learned variances and timestep respacing, as in DiT.

The numbers follow facebookresearch/DiT's ``diffusion`` package (itself IDDPM's code):
float64 schedules, coefficients gathered per timestep and cast to float32, the hybrid
loss L_simple + L_vlb with the vb term on a stop-gradient mean, and respacing that
calls the model with the timesteps of the original process.

Notation (Ho et al. 2020 "DDPM"; Nichol & Dhariwal 2021 "IDDPM"):

    t                     index 0..T-1 into *this* (possibly respaced) process; index t is the
                          paper's step t + 1, so t = 0 is the last denoising step
    timestep_map[t]       the timestep of the original process that index t stands for;
                          the model always sees timestep_map[t], never t
    betas[t]              beta_t, variance added by forward step t
    alphas_cumprod[t]     alpha_bar_t = prod_{s <= t} (1 - beta_s)
    alphas_cumprod_prev   alpha_bar_{t-1}, with alpha_bar_{-1} = 1
    x_start               x_0, clean data;  noise = eps ~ N(0, I)
    x_t                   sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps     (DDPM eq. 4)
    posterior_mean_coef1/2, posterior_variance
                          q(x_{t-1} | x_t, x_0) = N(coef1 x_0 + coef2 x_t, beta_tilde_t)
                          (DDPM eq. 6-7)
    model_var_values      v in [-1, 1]; Sigma_theta = exp(v' log beta_t + (1 - v') log beta_tilde_t),
                          v' = (v + 1) / 2                                      (IDDPM eq. 15)
    pred_xstart           x_0 predicted from eps: (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)
"""

import enum
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from .likelihood import discretized_gaussian_log_likelihood, masked_mean_flat, mean_flat, normal_kl


class ModelMeanType(enum.Enum):
    """What the mean half of the network output predicts."""

    EPSILON = enum.auto()
    START_X = enum.auto()


class ModelVarType(enum.Enum):
    """Where the reverse-step variance comes from."""

    FIXED_SMALL = enum.auto()  # beta_tilde_t
    FIXED_LARGE = enum.auto()  # beta_t (beta_tilde_1 at t = 0 for a better decoder likelihood)
    LEARNED_RANGE = enum.auto()  # IDDPM eq. 15, from the second half of the output channels


class LossType(enum.Enum):
    """Training loss; the names are IDDPM's."""

    MSE = enum.auto()  # L_simple (+ L_vlb when the variance is learned)
    RESCALED_MSE = enum.auto()  # as MSE, with the vb term multiplied by T / 1000
    RESCALED_KL = enum.auto()  # L_vlb alone, multiplied by T


def linear_betas(num_timesteps: int) -> np.ndarray:
    """DDPM's linear schedule 1e-4 .. 2e-2, stretched so that any T gives the same process as T = 1000."""
    scale = 1000 / num_timesteps
    return np.linspace(scale * 0.0001, scale * 0.02, num_timesteps, dtype=np.float64)


def betas_for_alpha_bar(num_timesteps: int, alpha_bar: Callable[[float], float], max_beta: float = 0.999) -> np.ndarray:
    """Discretise a continuous alpha_bar(s), s in [0, 1], into betas, each capped at max_beta."""
    betas = [
        min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), max_beta)
        for i in range(num_timesteps)
    ]
    return np.array(betas, dtype=np.float64)


def cosine_alpha_bar(s: float) -> float:
    """IDDPM's cosine schedule (eq. 17) before normalisation by its value at 0: cos^2((s + 0.008) / 1.008 * pi / 2)."""
    return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2


NOISE_SCHEDULES = ("linear", "cosine")


def get_named_beta_schedule(name: str, num_timesteps: int) -> np.ndarray:
    """Betas for "linear" or "cosine" (alias "squaredcos_cap_v2", DiT's name for it)."""
    if name == "linear":
        return linear_betas(num_timesteps)
    if name in ("cosine", "squaredcos_cap_v2"):
        return betas_for_alpha_bar(num_timesteps, cosine_alpha_bar)
    raise ValueError(f"unknown noise schedule {name!r}: use 'linear' or 'cosine'")


def space_timesteps(num_timesteps: int, section_counts: str | Sequence[int]) -> list[int]:
    """Which timesteps of a T-step process a shorter process keeps (IDDPM section 4.1).

    ``section_counts`` is "ddimN" (the single integer stride of the DDIM paper that gives
    exactly N steps), or N or "N1,N2,..." / a list of ints: the process is cut into as
    many equal sections and section i keeps Ni steps evenly spaced, ends included.
    Returns the kept timesteps in increasing order.
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired = int(section_counts[len("ddim") :])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return list(range(0, num_timesteps, stride))
            raise ValueError(
                f"cannot take exactly {desired} of {num_timesteps} steps with an integer stride; "
                f"use '{desired}' instead of 'ddim{desired}'"
            )
        section_counts = [int(n) for n in section_counts.split(",")]
    size_per, extra = divmod(num_timesteps, len(section_counts))
    start, kept = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot take {count} steps from a section of {size} steps")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        kept += [start + round(k * stride) for k in range(count)]
        start += size
    return sorted(set(kept))


class GaussianDiffusion:
    """A T-step Gaussian diffusion, possibly a respaced subset of a longer original process.

    Args:
        betas: the original process's betas, float64, length T_orig.
        model_mean_type, model_var_type, loss_type: see the enums.
        use_timesteps: timesteps of the original process to keep (all when None). The kept
            process has betas 1 - alpha_bar(tau_k) / alpha_bar(tau_{k-1}), so its alpha_bar at
            index k equals the original alpha_bar at tau_k.
        rescale_timesteps: call the model with tau * 1000 / T_orig (floats) instead of tau.
    """

    def __init__(
        self,
        *,
        betas: np.ndarray,
        model_mean_type: ModelMeanType,
        model_var_type: ModelVarType,
        loss_type: LossType,
        use_timesteps: Sequence[int] | None = None,
        rescale_timesteps: bool = False,
    ):
        self.original_betas = np.asarray(betas, dtype=np.float64)
        if self.original_betas.ndim != 1 or not ((self.original_betas > 0) & (self.original_betas <= 1)).all():
            raise ValueError("betas must be a 1-D array with values in (0, 1]")
        self.model_mean_type = model_mean_type
        self.model_var_type = model_var_type
        self.loss_type = loss_type
        self.rescale_timesteps = rescale_timesteps
        self.original_num_steps = len(self.original_betas)

        kept = sorted(set(use_timesteps)) if use_timesteps is not None else list(range(self.original_num_steps))
        if not kept or kept[0] < 0 or kept[-1] >= self.original_num_steps:
            raise ValueError(f"use_timesteps must be a non-empty subset of 0..{self.original_num_steps - 1}")
        self.timestep_map = np.array(kept, dtype=np.int64)
        original_alphas_cumprod = np.cumprod(1.0 - self.original_betas)
        kept_alphas_cumprod = original_alphas_cumprod[self.timestep_map]
        betas = 1.0 - kept_alphas_cumprod / np.append(1.0, kept_alphas_cumprod[:-1])
        self.betas = betas
        self.num_timesteps = len(betas)

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.one_minus_alphas_cumprod = 1.0 - self.alphas_cumprod
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)

        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # beta_tilde_0 = 0, so its log is clipped to log beta_tilde_1.
        if self.num_timesteps > 1:
            self.posterior_log_variance_clipped = np.log(
                np.append(self.posterior_variance[1], self.posterior_variance[1:])
            )
        else:
            self.posterior_log_variance_clipped = np.array([])
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        self.log_betas = np.log(betas)
        fixed_large = np.append(self.posterior_variance[1], betas[1:]) if self.num_timesteps > 1 else betas
        self.fixed_large_variance = fixed_large
        self.fixed_large_log_variance = np.log(fixed_large)
        self._device_tables: dict[tuple[str, torch.device], Tensor] = {}

    def respaced(self, section_counts: str | Sequence[int]) -> "GaussianDiffusion":
        """The same original process, keeping the timesteps ``space_timesteps`` picks for ``section_counts``."""
        return GaussianDiffusion(
            betas=self.original_betas,
            model_mean_type=self.model_mean_type,
            model_var_type=self.model_var_type,
            loss_type=self.loss_type,
            use_timesteps=space_timesteps(self.original_num_steps, section_counts),
            rescale_timesteps=self.rescale_timesteps,
        )

    def _table(self, name: str, device: torch.device) -> Tensor:
        """The numpy array attribute ``name`` as a tensor on ``device``, copied there once."""
        key = (name, device)
        if key not in self._device_tables:
            self._device_tables[key] = torch.from_numpy(getattr(self, name)).to(device)
        return self._device_tables[key]

    def _extract(self, name: str, t: Tensor, ndim: int) -> Tensor:
        """Coefficient table ``name`` at timesteps t, as float32 shaped (N, 1, ..., 1) to broadcast over ndim dims."""
        values = self._table(name, t.device)[t].float()
        return values.view(-1, *([1] * (ndim - 1)))  # (N,) -> (N, 1, ..., 1)

    def model_timesteps(self, t: Tensor) -> Tensor:
        """The timesteps the model is called with for indices t: the original process's, never the respaced index."""
        original = self._table("timestep_map", t.device)[t]
        if self.rescale_timesteps:
            return original.float() * (1000.0 / self.original_num_steps)
        return original.to(t.dtype)

    def _call_model(self, model: Callable[..., Tensor], x: Tensor, t: Tensor, model_kwargs: dict | None) -> Tensor:
        return model(x, self.model_timesteps(t), **(model_kwargs or {}))

    def q_mean_variance(self, x_start: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and log-variance of q(x_t | x_0), each shaped like x_start."""
        mean = self._extract("sqrt_alphas_cumprod", t, x_start.ndim) * x_start
        variance = self._extract("one_minus_alphas_cumprod", t, x_start.ndim).expand_as(x_start)
        log_variance = self._extract("log_one_minus_alphas_cumprod", t, x_start.ndim).expand_as(x_start)
        return mean, variance, log_variance

    def q_sample(self, x_start: Tensor, t: Tensor, noise: Tensor | None = None) -> Tensor:
        """Draw x_t ~ q(x_t | x_0) (DDPM eq. 4), with the given eps when ``noise`` is passed."""
        if noise is None:
            noise = torch.randn_like(x_start)
        if noise.shape != x_start.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} differs from x_start shape {tuple(x_start.shape)}")
        signal = self._extract("sqrt_alphas_cumprod", t, x_start.ndim)
        noise_scale = self._extract("sqrt_one_minus_alphas_cumprod", t, x_start.ndim)
        return signal * x_start + noise_scale * noise

    def q_posterior_mean_variance(self, x_start: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and clipped log-variance of the posterior q(x_{t-1} | x_t, x_0) (DDPM eq. 6-7)."""
        if x_start.shape != x_t.shape:
            raise ValueError(f"x_start shape {tuple(x_start.shape)} differs from x_t shape {tuple(x_t.shape)}")
        mean = (
            self._extract("posterior_mean_coef1", t, x_t.ndim) * x_start
            + self._extract("posterior_mean_coef2", t, x_t.ndim) * x_t
        )
        variance = self._extract("posterior_variance", t, x_t.ndim).expand_as(x_t)
        log_variance = self._extract("posterior_log_variance_clipped", t, x_t.ndim).expand_as(x_t)
        return mean, variance, log_variance

    def predict_xstart_from_eps(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """x_0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t), written as DiT writes it."""
        recip = self._extract("sqrt_recip_alphas_cumprod", t, x_t.ndim)
        recipm1 = self._extract("sqrt_recipm1_alphas_cumprod", t, x_t.ndim)
        return recip * x_t - recipm1 * eps

    def predict_eps_from_xstart(self, x_t: Tensor, t: Tensor, pred_xstart: Tensor) -> Tensor:
        """The eps that, with x_t, gives pred_xstart (inverse of ``predict_xstart_from_eps``)."""
        recip = self._extract("sqrt_recip_alphas_cumprod", t, x_t.ndim)
        recipm1 = self._extract("sqrt_recipm1_alphas_cumprod", t, x_t.ndim)
        return (recip * x_t - pred_xstart) / recipm1

    def _split_output(self, output: Tensor, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """(mean prediction, variance values or None) from a raw model output."""
        channels = x.shape[1]
        if self.model_var_type is ModelVarType.LEARNED_RANGE:
            if output.shape != (x.shape[0], 2 * channels, *x.shape[2:]):
                raise ValueError(
                    f"a learn_sigma diffusion needs model output {(x.shape[0], 2 * channels, *x.shape[2:])}, got {tuple(output.shape)}; "
                    "build the model with learn_sigma=True or the diffusion with learn_sigma=False"
                )
            mean_part, var_values = torch.split(output, channels, dim=1)
            return mean_part, var_values
        if output.shape != x.shape:
            raise ValueError(
                f"a fixed-variance diffusion needs model output {tuple(x.shape)}, got {tuple(output.shape)}; "
                "build the diffusion with learn_sigma=True for a model with learn_sigma=True"
            )
        return output, None

    def p_mean_variance_from_output(
        self,
        output: Tensor,
        x: Tensor,
        t: Tensor,
        clip_denoised: bool = True,
        denoised_fn: Callable[[Tensor], Tensor] | None = None,
    ) -> dict[str, Tensor]:
        """p(x_{t-1} | x_t) from an already computed model output; see ``p_mean_variance``."""
        mean_part, var_values = self._split_output(output, x)
        if var_values is not None:
            min_log = self._extract("posterior_log_variance_clipped", t, x.ndim)
            max_log = self._extract("log_betas", t, x.ndim)
            frac = (var_values + 1) / 2
            log_variance = frac * max_log + (1 - frac) * min_log
            variance = torch.exp(log_variance)
        elif self.model_var_type is ModelVarType.FIXED_LARGE:
            variance = self._extract("fixed_large_variance", t, x.ndim).expand_as(x)
            log_variance = self._extract("fixed_large_log_variance", t, x.ndim).expand_as(x)
        else:
            variance = self._extract("posterior_variance", t, x.ndim).expand_as(x)
            log_variance = self._extract("posterior_log_variance_clipped", t, x.ndim).expand_as(x)

        if self.model_mean_type is ModelMeanType.START_X:
            pred_xstart = mean_part
        else:
            pred_xstart = self.predict_xstart_from_eps(x, t, mean_part)
        if denoised_fn is not None:
            pred_xstart = denoised_fn(pred_xstart)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return {"mean": mean, "variance": variance, "log_variance": log_variance, "pred_xstart": pred_xstart}

    def p_mean_variance(
        self,
        model: Callable[..., Tensor],
        x: Tensor,
        t: Tensor,
        clip_denoised: bool = True,
        denoised_fn: Callable[[Tensor], Tensor] | None = None,
        model_kwargs: dict | None = None,
    ) -> dict[str, Tensor]:
        """Apply the model at x_t and return p(x_{t-1} | x_t) and the x_0 prediction.

        Returns a dict of tensors shaped like x: "mean", "variance", "log_variance",
        "pred_xstart". ``denoised_fn`` then ``clip_denoised`` (to [-1, 1]) act on the x_0
        prediction before it sets the mean.
        """
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must have shape ({x.shape[0]},), got {tuple(t.shape)}")
        output = self._call_model(model, x, t, model_kwargs)
        return self.p_mean_variance_from_output(output, x, t, clip_denoised, denoised_fn)

    def p_sample(
        self,
        model: Callable[..., Tensor],
        x: Tensor,
        t: Tensor,
        clip_denoised: bool = True,
        denoised_fn: Callable[[Tensor], Tensor] | None = None,
        model_kwargs: dict | None = None,
        noise_fn: Callable[[Tensor], Tensor] | None = None,
    ) -> dict[str, Tensor]:
        """One ancestral step x_t -> x_{t-1} ~ p(x_{t-1} | x_t) (DDPM Algorithm 2, line 4); no noise at t = 0.

        ``noise_fn(x)`` draws the step's eps like x (default ``torch.randn_like``); pass
        per-sample generators through it to make a sample independent of its batch.
        """
        out = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        nonzero = (t != 0).float().view(-1, *([1] * (x.ndim - 1)))  # (N,) -> (N, 1, ..., 1)
        sample = out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * (noise_fn or torch.randn_like)(x)
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def ddim_sample(
        self,
        model: Callable[..., Tensor],
        x: Tensor,
        t: Tensor,
        clip_denoised: bool = True,
        denoised_fn: Callable[[Tensor], Tensor] | None = None,
        model_kwargs: dict | None = None,
        eta: float = 0.0,
        noise_fn: Callable[[Tensor], Tensor] | None = None,
    ) -> dict[str, Tensor]:
        """One DDIM step x_t -> x_{t-1} (Song et al. 2021, eq. 12 with sigma from eq. 16 times eta).

        ``noise_fn`` as in ``p_sample``; with eta = 0 the noise is multiplied by zero.
        """
        out = self.p_mean_variance(model, x, t, clip_denoised, denoised_fn, model_kwargs)
        # eps is re-derived from the (possibly clipped) x_0 prediction, as DiT does.
        eps = self.predict_eps_from_xstart(x, t, out["pred_xstart"])
        alpha_bar = self._extract("alphas_cumprod", t, x.ndim)
        alpha_bar_prev = self._extract("alphas_cumprod_prev", t, x.ndim)
        sigma = eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * torch.sqrt(1 - alpha_bar / alpha_bar_prev)
        mean = out["pred_xstart"] * torch.sqrt(alpha_bar_prev) + torch.sqrt(1 - alpha_bar_prev - sigma**2) * eps
        nonzero = (t != 0).float().view(-1, *([1] * (x.ndim - 1)))  # (N,) -> (N, 1, ..., 1)
        sample = mean + nonzero * sigma * (noise_fn or torch.randn_like)(x)
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def p_sample_loop(
        self,
        model: Callable[..., Tensor],
        shape: Sequence[int],
        noise: Tensor | None = None,
        clip_denoised: bool = True,
        denoised_fn: Callable[[Tensor], Tensor] | None = None,
        *,
        model_kwargs: dict | None = None,
        device: torch.device | str | None = None,
        progress: bool = False,
        callback: Callable[[dict], None] | None = None,
        noise_fn: Callable[[Tensor], Tensor] | None = None,
    ) -> Tensor:
        """Ancestral sampling over every step of this process, from ``noise`` (or fresh N(0, I) of ``shape``).

        ``noise_fn`` draws each step's eps (see ``p_sample``).
        """
        from .samplers import Loop, gaussian_loop

        x_T = _initial_noise(shape, noise, device)
        loop = Loop(model_kwargs, None, progress, callback, noise_fn)
        return gaussian_loop(
            "p_sample", self, model, x_T, loop, dict(clip_denoised=clip_denoised, denoised_fn=denoised_fn)
        )

    def ddim_sample_loop(
        self,
        model: Callable[..., Tensor],
        shape: Sequence[int],
        noise: Tensor | None = None,
        clip_denoised: bool = True,
        denoised_fn: Callable[[Tensor], Tensor] | None = None,
        *,
        model_kwargs: dict | None = None,
        device: torch.device | str | None = None,
        progress: bool = False,
        eta: float = 0.0,
        callback: Callable[[dict], None] | None = None,
        noise_fn: Callable[[Tensor], Tensor] | None = None,
    ) -> Tensor:
        """DDIM sampling over every step of this process; eta = 0 is deterministic, eta = 1 is DDPM-like.

        ``noise_fn`` draws each step's eps when eta > 0 (see ``p_sample``).
        """
        from .samplers import Loop, gaussian_loop

        x_T = _initial_noise(shape, noise, device)
        loop = Loop(model_kwargs, None, progress, callback, noise_fn)
        options = dict(clip_denoised=clip_denoised, denoised_fn=denoised_fn, eta=eta)
        return gaussian_loop("ddim_sample", self, model, x_T, loop, options)

    def vb_terms_bpd(
        self, output: Tensor, x_start: Tensor, x_t: Tensor, t: Tensor, loss_mask: Tensor | None = None
    ) -> Tensor:
        """Per-sample L_t of the variational bound in bits per dimension, from a model output.

        KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t > 0 and the discretised
        decoder NLL -log p(x_0 | x_1) at t = 0 (IDDPM eq. 4-5); x_0 is not clipped.
        ``loss_mask`` (N, 1, H, W) averages over the pixels where it is 1 only.
        """

        def average(x: Tensor) -> Tensor:
            return mean_flat(x) if loss_mask is None else masked_mean_flat(x, loss_mask)

        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance_from_output(output, x_t, t, clip_denoised=False)
        kl = average(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])) / math.log(2.0)
        decoder_nll = -discretized_gaussian_log_likelihood(
            x_start, means=out["mean"], log_scales=0.5 * out["log_variance"]
        )
        decoder_nll = average(decoder_nll) / math.log(2.0)
        return torch.where(t == 0, decoder_nll, kl)

    def training_losses(
        self,
        model: Callable[..., Tensor],
        x_start: Tensor,
        t: Tensor,
        model_kwargs: dict | None = None,
        noise: Tensor | None = None,
        loss_mask: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Per-sample training losses at timestep indices t, each of shape (N,).

        MSE losses: "mse" = mean over pixels of (eps - eps_theta)^2 (or x_0 for
        predict_xstart), "vb" (learned variance only) = L_vlb on an output whose mean half
        is detached, so the vb term trains only the variance (IDDPM section 3.1), times
        T / 1000 for RESCALED_MSE; "loss" = mse + vb. RESCALED_KL: "loss" = T * L_vlb.
        ``loss_mask`` (N, 1, H, W), 1 where a pixel counts, restricts every mean over pixels
        to those pixels (masked training: visible patches).
        """
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise=noise)
        output = self._call_model(model, x_t, t, model_kwargs)

        if self.loss_type is LossType.RESCALED_KL:
            return {"loss": self.vb_terms_bpd(output, x_start, x_t, t, loss_mask) * self.num_timesteps}

        terms = {}
        mean_part, var_values = self._split_output(output, x_t)
        if var_values is not None:
            frozen = torch.cat([mean_part.detach(), var_values], dim=1)
            terms["vb"] = self.vb_terms_bpd(frozen, x_start, x_t, t, loss_mask)
            if self.loss_type is LossType.RESCALED_MSE:
                # Without the 1/1000 the vb term outweighs the mse term (IDDPM's note).
                terms["vb"] = terms["vb"] * (self.num_timesteps / 1000.0)
        target = x_start if self.model_mean_type is ModelMeanType.START_X else noise
        error = (target - mean_part) ** 2
        terms["mse"] = mean_flat(error) if loss_mask is None else masked_mean_flat(error, loss_mask)
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return terms


def _initial_noise(shape: Sequence[int], noise: Tensor | None, device: torch.device | str | None) -> Tensor:
    """x_T: the given noise (checked against shape) or a fresh standard normal draw."""
    if noise is None:
        return torch.randn(*shape, device=device)
    if tuple(noise.shape) != tuple(shape):
        raise ValueError(f"noise shape {tuple(noise.shape)} differs from shape {tuple(shape)}")
    return noise.to(device) if device is not None else noise


def create_diffusion(
    timestep_respacing: str | Sequence[int] | None,
    noise_schedule: str = "linear",
    use_kl: bool = False,
    sigma_small: bool = False,
    predict_xstart: bool = False,
    learn_sigma: bool = True,
    rescale_learned_sigmas: bool = False,
    diffusion_steps: int = 1000,
    rescale_timesteps: bool = False,
) -> GaussianDiffusion:
    """DiT's ``create_diffusion``: the same arguments, the same process.

    ``timestep_respacing`` "" or None keeps all ``diffusion_steps``; "250", "ddim50" or
    "10,15,20" respace (see ``space_timesteps``). The model is always called with the
    original timesteps (``rescale_timesteps`` maps them to 0..1000 floats instead).
    """
    betas = get_named_beta_schedule(noise_schedule, diffusion_steps)
    if use_kl:
        loss_type = LossType.RESCALED_KL
    elif rescale_learned_sigmas:
        loss_type = LossType.RESCALED_MSE
    else:
        loss_type = LossType.MSE
    if learn_sigma:
        var_type = ModelVarType.LEARNED_RANGE
    else:
        var_type = ModelVarType.FIXED_SMALL if sigma_small else ModelVarType.FIXED_LARGE
    if timestep_respacing is None or timestep_respacing == "":
        timestep_respacing = [diffusion_steps]
    return GaussianDiffusion(
        betas=betas,
        model_mean_type=ModelMeanType.START_X if predict_xstart else ModelMeanType.EPSILON,
        model_var_type=var_type,
        loss_type=loss_type,
        use_timesteps=space_timesteps(diffusion_steps, timestep_respacing),
        rescale_timesteps=rescale_timesteps,
    )
