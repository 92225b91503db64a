"""Samplers: one function per algorithm, all with one signature.

    sampler(process, model_fn, noise, *, model_kwargs=None, num_steps=None,
            progress=False, callback=None, noise_fn=None, **options) -> x_0

``process`` is what the model was trained with: a ``GaussianDiffusion`` for "ddpm" and
"ddim" (num_steps respaces it as DiT's sample.py does, "250" style; None keeps its own
steps), a ``RectifiedFlow`` for "euler" and "heun" (num_steps uniform steps from t = 1
to t = 0; None means 50, DiT-MoE's default). ``model_fn(x, t, **model_kwargs)`` is the
network, or a guided wrapper of it (see guidance.py).

``callback``, when given, is called at the start of every step, before the model is
evaluated there, with a dict: "step" (0-based), "num_steps", "t" (the timestep the model
is about to see: the original-process index for IDDPM, t in (0, 1] for flow before
t_scale) and "x" (the current x_t). A routing recorder uses it to tag what the
following forwards route.

``noise_fn(x)``, when given, draws the per-step noise of the stochastic samplers (ddpm,
ddim with eta > 0) as a tensor like x, in place of ``torch.randn_like``; per-sample
generators behind it make a sample independent of the batch it is drawn in. The ODE
samplers (euler, heun) take it for the common signature and draw no noise.
"""

from collections.abc import Callable, Iterable

import torch
from torch import Tensor

DEFAULT_FLOW_STEPS = 50


def _steps(num_steps: int, progress: bool) -> Iterable[int]:
    """range(num_steps), behind a tqdm bar when progress is asked for."""
    if progress:
        from tqdm.auto import tqdm

        return tqdm(range(num_steps))
    return range(num_steps)


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


def _gaussian_loop(
    step_fn: str, process, model_fn, noise, model_kwargs, num_steps, progress, callback, **step_options
) -> Tensor:
    """The DDPM/DDIM loop from index T-1 down to 0; ``step_fn`` names the process's one-step method."""
    process = _respaced(process, num_steps)
    x = noise
    for step in _steps(process.num_timesteps, progress):
        index = process.num_timesteps - 1 - step
        t = torch.full((x.shape[0],), index, device=x.device, dtype=torch.long)
        if callback is not None:
            callback({"step": step, "num_steps": process.num_timesteps, "t": int(process.timestep_map[index]), "x": x})
        x = getattr(process, step_fn)(model_fn, x, t, model_kwargs=model_kwargs, **step_options)["sample"]
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
    clip_denoised: bool = False,
    denoised_fn: Callable[[Tensor], Tensor] | None = None,
    noise_fn: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Ancestral sampling: Ho et al. 2020 "DDPM", Algorithm 2, with IDDPM's learned variances."""
    return _gaussian_loop(
        "p_sample",
        process,
        model_fn,
        noise,
        model_kwargs,
        num_steps,
        progress,
        callback,
        clip_denoised=clip_denoised,
        denoised_fn=denoised_fn,
        noise_fn=noise_fn,
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
    clip_denoised: bool = False,
    denoised_fn: Callable[[Tensor], Tensor] | None = None,
    eta: float = 0.0,
    noise_fn: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """DDIM: Song et al. 2021, eq. 12 (deterministic for eta = 0, the probability-flow discretisation)."""
    return _gaussian_loop(
        "ddim_sample",
        process,
        model_fn,
        noise,
        model_kwargs,
        num_steps,
        progress,
        callback,
        clip_denoised=clip_denoised,
        denoised_fn=denoised_fn,
        eta=eta,
        noise_fn=noise_fn,
    )


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
    num_steps = _flow_steps(num_steps)
    dt = 1.0 / num_steps
    x = noise
    for step in _steps(num_steps, progress):
        t = _flow_time(step, num_steps, x)
        if callback is not None:
            callback({"step": step, "num_steps": num_steps, "t": float(t[0]), "x": x})
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
    num_steps = _flow_steps(num_steps)
    dt = 1.0 / num_steps
    x = noise
    for step in _steps(num_steps, progress):
        t = _flow_time(step, num_steps, x)
        if callback is not None:
            callback({"step": step, "num_steps": num_steps, "t": float(t[0]), "x": x})
        v = process.velocity(model_fn, x, t, model_kwargs)
        x_euler = x - dt * v
        v_next = process.velocity(model_fn, x_euler, _flow_time(step + 1, num_steps, x), model_kwargs)
        x = x - dt * 0.5 * (v + v_next)
    return x


SAMPLERS: dict[str, Callable[..., Tensor]] = {"ddpm": ddpm, "ddim": ddim, "euler": euler, "heun": heun}
