"""Samplers: one function per algorithm, all with one signature.

    sampler(process, model_fn, noise, *, model_kwargs=None, num_steps=None,
            progress=False, callback=None, noise_fn=None, **options) -> x_0

``process`` is what the model was trained with: a ``GaussianDiffusion`` for "ddpm" and
"ddim" (num_steps respaces it as DiT's sample.py does, "250" style; None keeps its own
steps), a ``RectifiedFlow`` for "euler" and "heun" (num_steps uniform steps from t = 1
to t = 0; None means 50, DiT-MoE's default), either for the diffusers solvers "dpm++2m",
"dpm++3m", "dpm++2m-sde", "unipc" and "deis" (diffusers_schedulers.py; num_steps None means 25 for IDDPM
and 10 for flow). ``model_fn(x, t, **model_kwargs)`` is the network, or a guided wrapper of
it (see guidance.py).

``callback``, when given, is called at the start of every step, before the model is
evaluated there, with a dict: "step" (0-based), "num_steps", "t" (the timestep the model
is about to see: the original-process index for IDDPM, t in (0, 1] for flow before
t_scale) and "x" (the current x_t). A routing recorder uses it to tag what the
following forwards route.

``noise_fn(x)``, when given, draws the per-step noise of the stochastic samplers (ddpm,
dpm++2m-sde) as a tensor like x, in place of ``torch.randn_like``; per-sample
generators behind it make a sample independent of the batch it is drawn in. The ODE
samplers (ddim, euler, heun and the other diffusers solvers) take it for the common signature and
draw no noise. DDIM with eta > 0 and DDPM with clipping are DiT's ``ddim_sample_loop`` and
``p_sample_loop`` (gaussian.py), which run ``gaussian_loop`` with those options.
"""

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from . import diffusers_schedulers

DEFAULT_FLOW_STEPS = 50
# Solver defaults: the step counts at which published DiT-XL/2 results put DPM-Solver++ / UniPC
# close to DDPM-250 (IDDPM), and a fifth of Euler-50's evaluations (flow).
DEFAULT_SOLVER_STEPS = {"iddpm": 25, "flow": 10}


@dataclass
class Loop:
    """What every sampler's loop needs besides the process, the model and the noise."""

    model_kwargs: dict | None = None
    num_steps: int | None = None
    progress: bool = False
    callback: Callable[[dict], None] | None = None
    noise_fn: Callable[[Tensor], Tensor] | None = None

    def steps(self, count: int) -> Iterable[int]:
        """range(count), behind a tqdm bar when progress is asked for."""
        if self.progress:
            from tqdm.auto import tqdm

            return tqdm(range(count))
        return range(count)

    def notify(self, step: int, count: int, t: float | int, x: Tensor) -> None:
        """Call the callback (if any) at the start of a step, before the model sees x at t."""
        if self.callback is not None:
            self.callback({"step": step, "num_steps": count, "t": t, "x": x})


def _flow_steps(num_steps: int | None) -> int:
    if num_steps is None:
        return DEFAULT_FLOW_STEPS
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}")
    return num_steps


def _respaced(process, num_steps: int | None):
    """The Gaussian process to sample with: itself, or respaced to num_steps ("N" sections)."""
    if num_steps is None or num_steps == process.num_timesteps:
        return process
    return process.respaced(str(num_steps))


@torch.no_grad()
def gaussian_loop(step_fn: str, process, model_fn, noise, loop: Loop, step_options: dict | None = None) -> Tensor:
    """The DDPM/DDIM loop from index T-1 down to 0; ``step_fn`` names the process's one-step method
    ("p_sample" | "ddim_sample"), ``step_options`` its options (DiT's clip_denoised, denoised_fn, eta;
    default: no clipping, eta = 0)."""
    process = _respaced(process, loop.num_steps)
    options = {"clip_denoised": False, **(step_options or {})}
    x = noise
    for step in loop.steps(process.num_timesteps):
        index = process.num_timesteps - 1 - step
        t = torch.full((x.shape[0],), index, device=x.device, dtype=torch.long)
        loop.notify(step, process.num_timesteps, int(process.timestep_map[index]), x)
        x = getattr(process, step_fn)(
            model_fn, x, t, model_kwargs=loop.model_kwargs, noise_fn=loop.noise_fn, **options
        )["sample"]
    return x


@torch.no_grad()
def ddpm(
    process,
    model_fn: Callable[..., Tensor],
    noise: Tensor,
    *,
    model_kwargs: dict | None = None,
    num_steps: int | None = None,
    progress: bool = False,
    callback: Callable[[dict], None] | None = None,
    noise_fn: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Ancestral sampling: Ho et al. 2020 "DDPM", Algorithm 2, with IDDPM's learned variances."""
    return gaussian_loop(
        "p_sample", process, model_fn, noise, Loop(model_kwargs, num_steps, progress, callback, noise_fn)
    )


@torch.no_grad()
def ddim(
    process,
    model_fn: Callable[..., Tensor],
    noise: Tensor,
    *,
    model_kwargs: dict | None = None,
    num_steps: int | None = None,
    progress: bool = False,
    callback: Callable[[dict], None] | None = None,
    noise_fn: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """DDIM: Song et al. 2021, eq. 12 with eta = 0 (the probability-flow discretisation; deterministic)."""
    loop = Loop(model_kwargs, num_steps, progress, callback, noise_fn)
    return gaussian_loop("ddim_sample", process, model_fn, noise, loop)


def _flow_time(step: int, num_steps: int, like: Tensor) -> Tensor:
    """t = 1 - step / num_steps for the whole batch, float32: (N,)."""
    return torch.full((like.shape[0],), (num_steps - step) / num_steps, device=like.device, dtype=torch.float32)


@torch.no_grad()
def euler(
    process,
    model_fn: Callable[..., Tensor],
    noise: Tensor,
    *,
    model_kwargs: dict | None = None,
    num_steps: int | None = None,
    progress: bool = False,
    callback: Callable[[dict], None] | None = None,
    noise_fn: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Euler's method on the flow ODE dx/dt = v(x, t) from t = 1 to 0 (Liu et al. 2022, eq. 1; DiT-MoE's sampler).

    x_{t - dt} = x_t - dt * v_theta(x_t, t), dt = 1 / num_steps.
    """
    loop = Loop(model_kwargs, _flow_steps(num_steps), progress, callback)
    dt = 1.0 / loop.num_steps
    x = noise
    for step in loop.steps(loop.num_steps):
        t = _flow_time(step, loop.num_steps, x)
        loop.notify(step, loop.num_steps, float(t[0]), x)
        x = x - dt * process.velocity(model_fn, x, t, model_kwargs)
    return x


@torch.no_grad()
def heun(
    process,
    model_fn: Callable[..., Tensor],
    noise: Tensor,
    *,
    model_kwargs: dict | None = None,
    num_steps: int | None = None,
    progress: bool = False,
    callback: Callable[[dict], None] | None = None,
    noise_fn: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Heun's 2nd-order method on the flow ODE (Karras et al. 2022 "EDM", Algorithm 1 with no churn).

    Two model evaluations per step. EDM skips the correction on the last step because its
    derivative is undefined at sigma = 0; the flow velocity is defined at t = 0, so every
    step here is corrected.
    """
    loop = Loop(model_kwargs, _flow_steps(num_steps), progress, callback)
    dt = 1.0 / loop.num_steps
    x = noise
    for step in loop.steps(loop.num_steps):
        t = _flow_time(step, loop.num_steps, x)
        loop.notify(step, loop.num_steps, float(t[0]), x)
        v = process.velocity(model_fn, x, t, model_kwargs)
        x_euler = x - dt * v
        v_next = process.velocity(model_fn, x_euler, _flow_time(step + 1, loop.num_steps, x), model_kwargs)
        x = x - dt * 0.5 * (v + v_next)
    return x


def _solver(name: str) -> Callable[..., Tensor]:
    """The samplers.py-signature function running diffusers' solver `name` (diffusers_schedulers.py)."""

    @torch.no_grad()
    def sample(
        process,
        model_fn: Callable[..., Tensor],
        noise: Tensor,
        *,
        model_kwargs: dict | None = None,
        num_steps: int | None = None,
        progress: bool = False,
        callback: Callable[[dict], None] | None = None,
        noise_fn: Callable[[Tensor], Tensor] | None = None,
    ) -> Tensor:
        if num_steps is None:
            num_steps = DEFAULT_SOLVER_STEPS["flow" if hasattr(process, "t_scale") else "iddpm"]
        elif num_steps < 1:
            raise ValueError(f"num_steps must be at least 1, got {num_steps}")
        loop = Loop(model_kwargs, num_steps, progress, callback, noise_fn)
        return diffusers_schedulers.solve(name, process, model_fn, noise, loop)

    sample.__name__ = sample.__qualname__ = name.replace("+", "p").replace("-", "_")
    sample.__doc__ = f"diffusers' {name} solver on either objective (see diffusers_schedulers.py)."
    return sample


SOLVER_SAMPLERS: dict[str, Callable[..., Tensor]] = {name: _solver(name) for name in diffusers_schedulers.SOLVERS}


def default_num_steps(objective: str, sampler: str, objective_default: int) -> int:
    """Steps a sampler takes when none are asked for: the solvers' DEFAULT_SOLVER_STEPS, else the objective's."""
    return DEFAULT_SOLVER_STEPS[objective] if sampler in SOLVER_SAMPLERS else objective_default


SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "ddpm": ddpm,
    "ddim": ddim,
    "euler": euler,
    "heun": heun,
    **SOLVER_SAMPLERS,
}
