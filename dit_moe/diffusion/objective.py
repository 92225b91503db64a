"""The one interface the trainer and the sampling tools use for every objective.

    objective = build_objective("iddpm" | "flow", **options)
    terms = objective.loss(model_fn, x0, model_kwargs)       # terms["loss"]: (N,), weights applied
    x0 = objective.sample(model_fn, noise, model_kwargs, sampler="ddpm", num_steps=250)

``model_fn(x, t, **model_kwargs) -> (N, out_channels, H, W)`` everywhere, e.g.
model_kwargs=dict(y=labels). Both objectives are one class: a process (``GaussianDiffusion`` or
``RectifiedFlow``, same ``training_losses`` signature) plus a timestep sampler; adding one means
one more entry in ``KINDS`` and in ``build_objective``. The training loop never forks on the
objective and never touches its timestep sampler.

Distributed training (the objective owns its randomness):

    draws = objective.draw((seed, step, micro), global_batch, spec, device, part=slice(rank, None, world))
    terms = objective.loss(model_fn, x0, model_kwargs, noise=draws.noise, timesteps=(draws.t, draws.weights))

``draw`` makes the whole global micro-batch's timesteps, noise, label drops and patch masks from a
(seed, step, micro) stream and keeps one slice, so the same sample gets the same draws on any
number of processes and a resumed run continues the same streams. ``loss`` feeds each batch's
(t, loss) to ``observe``, which an adaptive timestep sampler learns from; with a ``gather``
function (every rank's slice in global order) every rank keeps the history one process would.

Masked training (MaskDiT): ``objective.loss(..., mask=mask)`` with the (N, T) patch mask the
model was given (True = masked) averages the denoising terms over visible patches and adds
``mae_weight`` times MaskDiT's MAE term: on masked patches, the first in_channels output
channels regress the per-patch normalised noisy input x_t.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..models.masking import random_mask
from .diffusers_schedulers import SOLVERS
from .flow import RectifiedFlow
from .gaussian import GaussianDiffusion, create_diffusion
from .samplers import SAMPLERS, default_num_steps
from .timesteps import TimestepSampler, build_continuous_sampler, build_discrete_sampler


@dataclass(frozen=True)
class Kind:
    """What differs between objectives besides the process: names for messages and samplers."""

    description: str  # for messages: "euler on an IDDPM model: ..."
    samplers: tuple[str, ...]  # the samplers that fit; the first is the default
    default_num_steps: int


KINDS = {
    "iddpm": Kind("an IDDPM model", ("ddpm", "ddim", *SOLVERS), 250),  # DiT's: eps MSE + learned-variance vb term
    "flow": Kind(
        "a rectified-flow model", ("euler", "heun", *SOLVERS), 50
    ),  # DiT-MoE's: velocity MSE on the straight path
}

Gather = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class DrawSpec:
    """What each training sample draws besides its timestep; fixed for a run."""

    sample_shape: tuple[int, ...]  # (C, H, W) of x0, the shape of the noise
    label_dropout: float = 0.0  # probability of the null label (classifier-free guidance)
    mask_ratio: float = 0.0  # MaskDiT: fraction of patches hidden; 0 draws no mask
    num_tokens: int = 0  # patches per sample, for the mask


@dataclass
class Draws:
    """One slice of a global micro-batch's randomness."""

    t: Tensor  # (N,) timesteps
    weights: Tensor  # (N,) their loss weights
    noise: Tensor  # (N, C, H, W)
    drop: Tensor  # (N,) long, 1 = train on the null label
    mask: Tensor | None = None  # (N, T) bool, True = masked patch; None: no masking


class Objective:
    """A training loss plus the samplers that invert it: a ``process`` (what the samplers integrate
    and what defines the loss) and ``timesteps`` (a TimestepSampler), with the ``KINDS`` entry of
    ``name`` as ``description``, ``samplers`` and ``default_num_steps``.

    ``gather`` (optional) returns every rank's slice of a tensor in global-batch order; ``observe``
    uses it so an adaptive timestep sampler learns from the whole global batch on every rank.
    """

    def __init__(
        self,
        name: str,
        process: GaussianDiffusion | RectifiedFlow,
        timesteps: TimestepSampler,
        gather: Gather | None = None,
    ):
        kind = KINDS[name]
        self.name = name
        self.process = process
        self.timesteps = timesteps
        self.gather = gather
        self.description = kind.description
        self.samplers = kind.samplers
        self.default_num_steps = kind.default_num_steps

    def draw(
        self,
        key: tuple[int, int, int],
        global_batch: int,
        spec: DrawSpec,
        device: torch.device | str,
        part: slice = slice(None),
    ) -> Draws:
        """The randomness of one global micro-batch, drawn from a stream seeded by ``key`` =
        (seed, step, micro-step); returns the samples ``part`` selects (a data-parallel rank's slice).

        The patch masks are drawn after the other draws, so unmasked runs keep their streams.
        """
        device = torch.device(device)
        stream_seed = int(np.random.SeedSequence(list(key)).generate_state(1)[0])
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(stream_seed)
            t, weights = self.timesteps.sample(global_batch, device)
            noise = torch.randn((global_batch, *spec.sample_shape), device=device)
            drop = torch.rand(global_batch, device=device) < spec.label_dropout
            mask = (
                random_mask(global_batch, spec.num_tokens, spec.mask_ratio, device=device).mask[part]
                if spec.mask_ratio
                else None
            )
        return Draws(t[part], weights[part], noise[part], drop[part].long(), mask)

    def observe(self, t: Tensor, losses: Tensor) -> None:
        """Feed the unweighted per-sample losses at t to an adaptive timestep sampler.

        Samplers that do not learn from losses cost nothing here (no collective, no host sync).
        """
        if not self.timesteps.learns_from_losses:
            return
        if self.gather is not None:
            t, losses = self.gather(t), self.gather(losses)
        self.timesteps.update(t, losses)

    def loss(
        self,
        model_fn: Callable[..., Tensor],
        x0: Tensor,
        model_kwargs: dict | None = None,
        noise: Tensor | None = None,
        timesteps: tuple[Tensor, Tensor] | None = None,
        mask: Tensor | None = None,
        mae_weight: float = 0.1,
    ) -> dict[str, Tensor]:
        """Per-sample training terms for a batch x0, timesteps drawn by ``self.timesteps``.

        ``timesteps`` = (t, weights) drawn beforehand (``draw``) lets a distributed trainer draw
        them for the whole global batch and hand each rank its slice.
        Returns (N,) tensors: "loss" (the sampler's weights applied: to the whole loss,
        or to the mse term only when ``self.timesteps.weight_target == "mse"``), the unweighted
        "mse" (and "vb" for learned-variance IDDPM) for logging, and "t" (IDDPM: timestep
        index; flow: time in (0, 1)). Reduce "loss" with ``.mean()`` for the step.

        ``mask`` (N, T) bool, the patch mask the model was called with (True = masked): the
        terms above then average over visible patches, and "mae" (N,), MaskDiT's reconstruction
        term on masked patches, is returned and added to "loss" as ``mae_weight * mae``
        (after the timestep weights, as MaskDiT does).

        The unweighted per-sample losses go to ``observe`` (an adaptive sampler learns from them).
        """
        t, weights = timesteps if timesteps is not None else self.timesteps.sample(x0.shape[0], x0.device)
        if mask is None:
            terms = self.process.training_losses(model_fn, x0, t, model_kwargs=model_kwargs, noise=noise)
        else:
            seen: dict[str, Tensor] = {}

            def recorded_fn(x: Tensor, *args, **kwargs) -> Tensor:
                # Both objectives call the network exactly once, at x_t; the MAE term needs that call.
                seen["x_t"], seen["output"] = x, model_fn(x, *args, **kwargs)
                return seen["output"]

            terms = self.process.training_losses(
                recorded_fn, x0, t, model_kwargs=model_kwargs, noise=noise, loss_mask=visible_pixels(mask, x0.shape)
            )
        self.observe(t, terms["loss"].detach())
        if self.timesteps.weight_target == "mse" and "mse" in terms:
            weighted = weights * terms["mse"] + (terms["loss"] - terms["mse"])
        else:
            weighted = weights * terms["loss"]
        if mask is not None:
            terms["mae"] = mae_loss(seen["x_t"], seen["output"][:, : x0.shape[1]], mask)
            weighted = weighted + mae_weight * terms["mae"]
        return {**terms, "loss": weighted, "t": t}

    def sample(
        self,
        model_fn: Callable[..., Tensor],
        noise: Tensor,
        model_kwargs: dict | None = None,
        sampler: str | None = None,
        num_steps: int | None = None,
        progress: bool = False,
        callback: Callable[[dict], None] | None = None,
        noise_fn: Callable[[Tensor], Tensor] | None = None,
    ) -> Tensor:
        """Integrate from ``noise`` to data with ``sampler`` (default: the first in ``self.samplers``).

        ``num_steps`` None means ``default_num_steps``. ``callback`` gets a dict per step
        and ``noise_fn`` draws the step noise of stochastic samplers (see samplers.py).
        Pass ``guided(model_fn, ...)`` as ``model_fn`` for CFG.
        """
        sampler = sampler or self.samplers[0]
        if sampler not in self.samplers:
            fits = " or ".join(self.samplers)
            if sampler in SAMPLERS:
                raise ValueError(f"{sampler} on {self.description}: use {fits}")
            raise ValueError(f"unknown sampler {sampler!r}: use {fits}")
        return SAMPLERS[sampler](
            self.process,
            model_fn,
            noise,
            model_kwargs=model_kwargs,
            num_steps=num_steps or default_num_steps(self.name, sampler, self.default_num_steps),
            progress=progress,
            callback=callback,
            noise_fn=noise_fn,
        )


_IDDPM_OPTIONS = {
    "noise_schedule",
    "learn_sigma",
    "diffusion_steps",
    "timestep_sampler",
    "sigma_small",
    "predict_xstart",
    "rescale_learned_sigmas",
    "use_kl",
}
_FLOW_OPTIONS = {"learn_sigma", "t_scale", "timestep_sampler"}


def build_objective(name: str, gather: Gather | None = None, **options) -> Objective:
    """An objective by name with its options (and ``gather``, see ``Objective``).

    iddpm: noise_schedule ("linear"), learn_sigma (True), diffusion_steps (1000),
        timestep_sampler ("uniform" | "speedit" | "speed" | "loss-second-moment"), and DiT's
        sigma_small, predict_xstart, rescale_learned_sigmas, use_kl.
    flow: learn_sigma (True), t_scale (1.0), timestep_sampler ("logit-normal" | "uniform").
    """
    if name == "iddpm":
        _check_options(name, options, _IDDPM_OPTIONS)
        sampler_name = options.pop("timestep_sampler", "uniform")
        diffusion = create_diffusion("", **options)
        return Objective(name, diffusion, build_discrete_sampler(sampler_name, diffusion.alphas_cumprod), gather)
    if name == "flow":
        _check_options(name, options, _FLOW_OPTIONS)
        flow = RectifiedFlow(learn_sigma=options.get("learn_sigma", True), t_scale=options.get("t_scale", 1.0))
        return Objective(name, flow, build_continuous_sampler(options.get("timestep_sampler", "logit-normal")), gather)
    raise ValueError(f"unknown objective {name!r}: use 'iddpm' or 'flow'")


def _check_options(name: str, options: dict, allowed: set[str]) -> None:
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(
            f"{name} objective has no option(s) {', '.join(unknown)}; it takes {', '.join(sorted(allowed))}"
        )


def patch_size_of(mask: Tensor, shape: torch.Size | tuple[int, ...]) -> int:
    """The patch side p of a (N, T) token mask over square images of shape (N, C, H, W)."""
    height, width = shape[-2:]
    grid = math.isqrt(mask.shape[1])
    if grid * grid != mask.shape[1] or height != width or height % grid:
        raise ValueError(
            f"a mask over {mask.shape[1]} tokens does not tile a {height}x{width} input into square patches."
        )
    return height // grid


def patchify(x: Tensor, patch_size: int) -> Tensor:
    """(N, C, H, W) -> (N, T, p*p*C), tokens in the model's row-major patch order."""
    n, c, height, width = x.shape
    p = patch_size
    x = x.reshape(n, c, height // p, p, width // p, p)  # (N, C, h, p, w, p)
    x = torch.einsum("nchpwq->nhwpqc", x)  # (N, h, w, p, p, C)
    return x.reshape(n, (height // p) * (width // p), p * p * c)


def visible_pixels(mask: Tensor, shape: torch.Size | tuple[int, ...]) -> Tensor:
    """(N, T) token mask (True = masked) -> (N, 1, H, W) float, 1 on the pixels of visible patches."""
    p = patch_size_of(mask, shape)
    grid = math.isqrt(mask.shape[1])
    visible = (~mask).to(torch.float32).view(-1, 1, grid, grid)  # (N, 1, h, w)
    return visible.repeat_interleave(p, dim=2).repeat_interleave(p, dim=3)  # (N, 1, H, W)


def mae_loss(x_t: Tensor, prediction: Tensor, mask: Tensor) -> Tensor:
    """MaskDiT's MAE term (MAE's norm_pix_loss) per sample, (N,).

    Each patch of the noisy input x_t is normalised by its own mean and (unbiased) variance,
    (v - mean) / sqrt(var + 1e-6); the squared error to the same patch of ``prediction``
    (N, C, H, W) is averaged over the patch, then over the masked patches of each sample
    (0 where a sample has none).
    """
    p = patch_size_of(mask, x_t.shape)
    target = patchify(x_t, p)  # (N, T, p*p*C)
    target = (target - target.mean(dim=-1, keepdim=True)) / (target.var(dim=-1, keepdim=True) + 1e-6).sqrt()
    per_patch = ((patchify(prediction, p) - target) ** 2).mean(dim=-1)  # (N, T)
    masked = mask.to(per_patch.dtype)
    return (per_patch * masked).sum(dim=1) / masked.sum(dim=1).clamp(min=1.0)
