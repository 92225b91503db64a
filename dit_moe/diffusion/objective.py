"""The one interface the trainer and the sampling tools use for every objective.

    objective = build_objective("iddpm" | "flow", **options)
    terms = objective.loss(model_fn, x0, model_kwargs)       # terms["loss"]: (N,), weights applied
    x0 = objective.sample(model_fn, noise, model_kwargs, sampler="ddpm", num_steps=250)

``model_fn(x, t, **model_kwargs) -> (N, out_channels, H, W)`` everywhere, e.g.
model_kwargs=dict(y=labels). Adding an objective means one more ``Objective`` subclass
and one entry in ``build_objective``; the training loop never forks on the objective.

Masked training (MaskDiT): ``objective.loss(..., mask=mask)`` with the (N, T) patch mask the
model was given (True = masked) averages the denoising terms over visible patches and adds
``mae_weight`` times MaskDiT's MAE term: on masked patches, the first in_channels output
channels regress the per-patch normalised noisy input x_t.
"""

import math
from collections.abc import Callable

import torch
from torch import Tensor

from .flow import RectifiedFlow
from .gaussian import GaussianDiffusion, create_diffusion
from .samplers import SAMPLERS
from .timesteps import TimestepSampler, build_continuous_sampler, build_discrete_sampler


class Objective:
    """A training loss plus the samplers that invert it.

    Subclasses set ``description`` (for messages), ``process`` (what the samplers integrate), ``samplers``
    (the names that fit, the first is the default), ``default_num_steps`` and
    ``timesteps`` (a TimestepSampler), and implement ``_losses``.
    """

    description: str
    process: GaussianDiffusion | RectifiedFlow
    samplers: tuple[str, ...]
    default_num_steps: int
    timesteps: TimestepSampler

    def _losses(
        self, model_fn: Callable[..., Tensor], x0: Tensor, t: Tensor, model_kwargs: dict | None, noise: Tensor | None,
        loss_mask: Tensor | None,
    ) -> dict[str, Tensor]:
        """Unweighted per-sample terms at times t, averaged where loss_mask (N, 1, H, W) is 1; must hold "loss"."""
        raise NotImplementedError

    def loss(
        self,
        model_fn: Callable[..., Tensor],
        x0: Tensor,
        model_kwargs: dict | None = None,
        noise: Tensor | None = None,
        timesteps: tuple[Tensor, Tensor] | None = None,
        mask: Tensor | None = None,
        mae_weight: float = 0.1,
        loss_feedback: Callable[[Tensor, Tensor], None] | None = None,
    ) -> dict[str, Tensor]:
        """Per-sample training terms for a batch x0, timesteps drawn by ``self.timesteps``.

        ``timesteps`` = (t, weights) drawn beforehand with ``self.timesteps.sample`` lets a
        distributed trainer draw them for the whole global batch and hand each rank its slice.
        Returns (N,) tensors: "loss" (the sampler's weights applied: to the whole loss,
        or to the mse term only when ``self.timesteps.weight_target == "mse"``), the unweighted
        "mse" (and "vb" for learned-variance IDDPM) for logging, and "t" (IDDPM: timestep
        index; flow: time in (0, 1)). Reduce "loss" with ``.mean()`` for the step.

        ``mask`` (N, T) bool, the patch mask the model was called with (True = masked): the
        terms above then average over visible patches, and "mae" (N,), MaskDiT's reconstruction
        term on masked patches, is returned and added to "loss" as ``mae_weight * mae``
        (after the timestep weights, as MaskDiT does).

        ``loss_feedback(t, unweighted_losses)`` receives the per-sample losses an adaptive
        timestep sampler learns from; by default ``self.timesteps.update`` (a distributed
        trainer passes a function that gathers them from every rank first).
        """
        t, weights = timesteps if timesteps is not None else self.timesteps.sample(x0.shape[0], x0.device)
        if mask is None:
            terms = self._losses(model_fn, x0, t, model_kwargs, noise, None)
        else:
            seen: dict[str, Tensor] = {}

            def recorded_fn(x: Tensor, *args, **kwargs) -> Tensor:
                # Both objectives call the network exactly once, at x_t; the MAE term needs that call.
                seen["x_t"], seen["output"] = x, model_fn(x, *args, **kwargs)
                return seen["output"]

            terms = self._losses(recorded_fn, x0, t, model_kwargs, noise, visible_pixels(mask, x0.shape))
        (loss_feedback or self.timesteps.update)(t, terms["loss"].detach())
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
            num_steps=num_steps or self.default_num_steps,
            progress=progress,
            callback=callback,
            noise_fn=noise_fn,
        )


class IDDPMObjective(Objective):
    """DiT's objective: eps MSE + learned-variance vb term on a Gaussian diffusion."""

    description = "an IDDPM model"
    samplers = ("ddpm", "ddim")
    default_num_steps = 250

    def __init__(self, diffusion: GaussianDiffusion, timesteps: TimestepSampler):
        self.process = diffusion
        self.timesteps = timesteps

    def _losses(self, model_fn, x0, t, model_kwargs, noise, loss_mask):
        return self.process.training_losses(model_fn, x0, t, model_kwargs=model_kwargs, noise=noise,
                                            loss_mask=loss_mask)


class FlowObjective(Objective):
    """DiT-MoE's rectified-flow objective: velocity MSE on the straight path."""

    description = "a rectified-flow model"
    samplers = ("euler", "heun")
    default_num_steps = 50

    def __init__(self, flow: RectifiedFlow, timesteps: TimestepSampler):
        self.process = flow
        self.timesteps = timesteps

    def _losses(self, model_fn, x0, t, model_kwargs, noise, loss_mask):
        return self.process.training_losses(model_fn, x0, t, model_kwargs=model_kwargs, noise=noise,
                                            loss_mask=loss_mask)


_IDDPM_OPTIONS = {
    "noise_schedule", "learn_sigma", "diffusion_steps", "timestep_sampler",
    "sigma_small", "predict_xstart", "rescale_learned_sigmas", "use_kl",
}
_FLOW_OPTIONS = {"learn_sigma", "t_scale", "timestep_sampler"}


def build_objective(name: str, **options) -> Objective:
    """An objective by name with its options.

    iddpm: noise_schedule ("linear"), learn_sigma (True), diffusion_steps (1000),
        timestep_sampler ("uniform" | "speedit" | "loss-second-moment"), and DiT's
        sigma_small, predict_xstart, rescale_learned_sigmas, use_kl.
    flow: learn_sigma (True), t_scale (1.0), timestep_sampler ("logit-normal" | "uniform").
    """
    if name == "iddpm":
        _check_options(name, options, _IDDPM_OPTIONS)
        sampler_name = options.pop("timestep_sampler", "uniform")
        diffusion = create_diffusion("", **options)
        return IDDPMObjective(diffusion, build_discrete_sampler(sampler_name, diffusion.alphas_cumprod))
    if name == "flow":
        _check_options(name, options, _FLOW_OPTIONS)
        flow = RectifiedFlow(learn_sigma=options.get("learn_sigma", True), t_scale=options.get("t_scale", 1.0))
        return FlowObjective(flow, build_continuous_sampler(options.get("timestep_sampler", "logit-normal")))
    raise ValueError(f"unknown objective {name!r}: use 'iddpm' or 'flow'")


def _check_options(name: str, options: dict, allowed: set[str]) -> None:
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(f"{name} objective has no option(s) {', '.join(unknown)}; it takes {', '.join(sorted(allowed))}")



def patch_size_of(mask: Tensor, shape: torch.Size | tuple[int, ...]) -> int:
    """The patch side p of a (N, T) token mask over square images of shape (N, C, H, W)."""
    height, width = shape[-2:]
    grid = math.isqrt(mask.shape[1])
    if grid * grid != mask.shape[1] or height != width or height % grid:
        raise ValueError(f"a mask over {mask.shape[1]} tokens does not tile a {height}x{width} input into square patches.")
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
