"""The one interface the trainer and the sampling tools use for every objective.

    objective = build_objective("iddpm" | "flow", **options)
    terms = objective.loss(model_fn, x0, model_kwargs)       # terms["loss"]: (N,), weights applied
    x0 = objective.sample(model_fn, noise, model_kwargs, sampler="ddpm", num_steps=250)

``model_fn(x, t, **model_kwargs) -> (N, out_channels, H, W)`` everywhere, e.g.
model_kwargs=dict(y=labels). Adding an objective means one more ``Objective`` subclass
and one entry in ``build_objective``; the training loop never forks on the objective.
"""

from collections.abc import Callable

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
        self, model_fn: Callable[..., Tensor], x0: Tensor, t: Tensor, model_kwargs: dict | None, noise: Tensor | None
    ) -> dict[str, Tensor]:
        """Unweighted per-sample terms at times t; must hold "loss" and "mse"."""
        raise NotImplementedError

    def loss(
        self,
        model_fn: Callable[..., Tensor],
        x0: Tensor,
        model_kwargs: dict | None = None,
        noise: Tensor | None = None,
        timesteps: tuple[Tensor, Tensor] | None = None,
    ) -> dict[str, Tensor]:
        """Per-sample training terms for a batch x0, timesteps drawn by ``self.timesteps``.

        ``timesteps`` = (t, weights) drawn beforehand with ``self.timesteps.sample`` lets a
        distributed trainer draw them for the whole global batch and hand each rank its slice.
        Returns (N,) tensors: "loss" (the sampler's weights applied: to the whole loss,
        or to the mse term only when ``self.timesteps.weight_target == "mse"``), the unweighted
        "mse" (and "vb" for learned-variance IDDPM) for logging, and "t" (IDDPM: timestep
        index; flow: time in (0, 1)). Reduce "loss" with ``.mean()`` for the step.
        """
        t, weights = timesteps if timesteps is not None else self.timesteps.sample(x0.shape[0], x0.device)
        terms = self._losses(model_fn, x0, t, model_kwargs, noise)
        self.timesteps.update(t, terms["loss"].detach())
        if self.timesteps.weight_target == "mse" and "mse" in terms:
            weighted = weights * terms["mse"] + (terms["loss"] - terms["mse"])
        else:
            weighted = weights * terms["loss"]
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

    def _losses(self, model_fn, x0, t, model_kwargs, noise):
        return self.process.training_losses(model_fn, x0, t, model_kwargs=model_kwargs, noise=noise)


class FlowObjective(Objective):
    """DiT-MoE's rectified-flow objective: velocity MSE on the straight path."""

    description = "a rectified-flow model"
    samplers = ("euler", "heun")
    default_num_steps = 50

    def __init__(self, flow: RectifiedFlow, timesteps: TimestepSampler):
        self.process = flow
        self.timesteps = timesteps

    def _losses(self, model_fn, x0, t, model_kwargs, noise):
        return self.process.training_losses(model_fn, x0, t, model_kwargs=model_kwargs, noise=noise)


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

