"""The field's multistep ODE solvers (DPM-Solver++, UniPC, DEIS), taken from diffusers, driving our models.

    scheduler = build_scheduler(ObjectiveConfig(objective="flow", flow_t_scale=1000.0), "unipc")
    x0 = dpm_2m(process, model_fn, noise, model_kwargs=dict(y=labels), num_steps=10)   # samplers.py signature

One adapter for both objectives; what it maps between diffusers and our processes:

    IDDPM  diffusers' epsilon prediction over our betas (`trained_betas`, so linear, cosine and any
           diffusion_steps match the training schedule exactly). The model is called with the
           scheduler's integer timestep, the original-process index DiT's models were trained on.
           With learn_sigma the model outputs 2C channels; the first C (eps) go to the solver and the
           C variance channels are dropped here: diffusers' `variance_type="learned_range"` splits
           off 3 channels, which is wrong for 4-channel latents, and an ODE solver uses no variance.
           Classifier-free guidance (and DiT's 3-channel variant) is applied by the model wrapper
           before this split, so it is kept as asked.
    flow   diffusers' `flow_prediction` with `use_flow_sigmas` and shift 1: its sigma is our t
           (x_t = (1 - t) x_0 + t eps, v = eps - x_0, x_0 = x_t - t v). diffusers hands the model
           `sigma * num_train_timesteps` as the timestep (sigma x 1000, rounded to an integer); we call
           the model with `sigma * t_scale` (the time scale it was trained with, RectifiedFlow.t_scale)
           from the float sigmas instead, so DiT-MoE's t_scale = 1 files and t_scale = 1000 files both
           see what they saw in training.

Solvers (one model evaluation per step; guided: two rows per sample):

    dpm++2m       DPM-Solver++(2M), Lu et al. 2022 "DPM-Solver++", Algorithm 2 (data prediction)
    dpm++3m       DPM-Solver++(3M), the same paper's third-order multistep variant
    dpm++2m-sde   SDE-DPM-Solver++(2M), the same paper's solver of the reverse SDE (section 5 and its
                  appendix): each step re-injects fresh noise, as DDPM does, drawn by the loop's
                  noise_fn (per-sample generators, so a sample does not depend on its batch)
    unipc         UniPC-bh2 with order 2, Zhao et al. 2023 (predictor + corrector, no extra evaluation)
    deis          DEIS (t-AB, order 2), Zhang & Chen 2022, "DEIS" section 4

All but dpm++2m-sde are deterministic ODE solvers. A stochastic one exists because on a weak IDDPM
model the ODE solvers at 25 steps draw fewer recognisable digits than DDPM's 250 stochastic steps
(docs/sampling.md): the noise a stochastic step adds also corrects the errors of earlier steps.

diffusers' FlowMatchEuler/FlowMatchHeun schedulers at shift 1 are our `euler` and `heun` (same
uniform grid in t, same updates), so they add no sampler here.

Notation: sigma is the scheduler's noise level (IDDPM: sqrt((1 - abar) / abar); flow: t);
"timestep" is what the model is called with.

Cost at DiT-MoE-G/2 16E2A on 64 GPUs: a scheduler holds the last `solver_order` model outputs
(<= 3 latent tensors of the rank's batch) and a table of 1000 betas; nothing is communicated.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

FLOW_TRAIN_STEPS = 1000  # diffusers' num_train_timesteps for flow grids; only the grid's resolution
# DEIS's flow grid repeats its last nonzero sigma instead of ending at 0 (its update has 0 * inf there);
# ending at this t leaves noise at 1/1000 of the data's scale, as DEIS's own IDDPM grid ends at sigma_min.
DEIS_FLOW_LAST_SIGMA = 1e-3

SOLVER_SETTINGS: dict[str, tuple[str, dict]] = {
    "dpm++2m": ("DPMSolverMultistepScheduler", dict(solver_order=2, algorithm_type="dpmsolver++")),
    "dpm++3m": ("DPMSolverMultistepScheduler", dict(solver_order=3, algorithm_type="dpmsolver++")),
    "dpm++2m-sde": ("DPMSolverMultistepScheduler", dict(solver_order=2, algorithm_type="sde-dpmsolver++")),
    "unipc": ("UniPCMultistepScheduler", dict(solver_order=2, solver_type="bh2")),
    "deis": ("DEISMultistepScheduler", dict(solver_order=2, algorithm_type="deis")),
}
SOLVERS = tuple(SOLVER_SETTINGS)
STOCHASTIC_SOLVERS = ("dpm++2m-sde",)


def build_scheduler(objective, sampler: str):
    """The configured diffusers scheduler for `sampler` (a key of SOLVER_SETTINGS) on a model trained
    with `objective` (a dit_moe.diffusion.ObjectiveConfig). The public entry for tools that build
    diffusers pipelines; call the model at `model_timestep(objective, scheduler, i)` for step i."""
    from .config import ObjectiveConfig
    from .objective import build_objective

    if not isinstance(objective, ObjectiveConfig):
        raise TypeError(f"objective must be an ObjectiveConfig, got {type(objective).__name__}")
    process = build_objective(objective.objective, **objective.build_options(learn_sigma=True)).process
    return scheduler_for(process, sampler)


def model_timestep(objective, scheduler, index: int) -> float:
    """What the model trained with `objective` is called with at step `index` of `scheduler`
    (set_timesteps called): the integer timestep for IDDPM, sigma * flow_t_scale for flow."""
    if objective.objective == "flow":
        return float(scheduler.sigmas[index]) * objective.flow_t_scale
    return float(scheduler.timesteps[index])


def _is_flow(process) -> bool:
    return hasattr(process, "t_scale")


def scheduler_for(process, sampler: str):
    """A fresh diffusers scheduler for `sampler` matching `process` (GaussianDiffusion or RectifiedFlow)."""
    import diffusers

    if sampler not in SOLVER_SETTINGS:
        raise ValueError(f"unknown solver {sampler!r}: use one of {', '.join(SOLVERS)}")
    class_name, settings = SOLVER_SETTINGS[sampler]
    if _is_flow(process):
        objective_settings = dict(
            num_train_timesteps=FLOW_TRAIN_STEPS,
            use_flow_sigmas=True,
            flow_shift=1.0,
            prediction_type="flow_prediction",
        )
    else:
        if process.num_timesteps != process.original_num_steps:
            raise ValueError("pass the unrespaced GaussianDiffusion; the solver picks its own timesteps")
        objective_settings = dict(
            num_train_timesteps=process.num_timesteps,
            trained_betas=np.asarray(process.betas, dtype=np.float64),
            prediction_type="epsilon",
        )
    return getattr(diffusers, class_name)(**objective_settings, **settings)


def _prepare_grid(scheduler, process, num_steps: int, device) -> None:
    scheduler.set_timesteps(num_steps, device=device)
    if _is_flow(process) and type(scheduler).__name__ == "DEISMultistepScheduler":
        scheduler.sigmas[-1] = DEIS_FLOW_LAST_SIGMA


def _prediction(process, model_fn: Callable[..., Tensor], x: Tensor, time: Tensor, model_kwargs) -> Tensor:
    """The solver's input: velocity (flow, `time` = t) or eps (IDDPM, `time` = index), variance channels dropped."""
    if _is_flow(process):
        return process.velocity(model_fn, x, time, model_kwargs)
    return model_fn(x, time, **(model_kwargs or {}))[:, : x.shape[1]]


def solve(sampler: str, process, model_fn: Callable[..., Tensor], noise: Tensor, loop) -> Tensor:
    """Integrate from `noise` (at the scheduler's largest sigma) to data with diffusers' `sampler`.

    `loop` carries the samplers.py options: model_kwargs, num_steps, progress, callback, noise_fn
    (the step noise of a stochastic solver; torch.randn_like when None).
    The callback's "t" is the original-process index (IDDPM) or t in (0, 1] (flow), as for our samplers.
    """
    scheduler = scheduler_for(process, sampler)
    _prepare_grid(scheduler, process, loop.num_steps, noise.device)
    x = noise * scheduler.init_noise_sigma
    for step in loop.steps(len(scheduler.timesteps)):
        timestep = scheduler.timesteps[step]
        flow_t = float(scheduler.sigmas[step])
        label = flow_t if _is_flow(process) else int(timestep)
        loop.notify(step, len(scheduler.timesteps), label, x)
        time = torch.full(
            (x.shape[0],), label, device=x.device, dtype=torch.float32 if _is_flow(process) else torch.long
        )
        prediction = _prediction(process, model_fn, x, time, loop.model_kwargs)
        step_noise = {}
        if sampler in STOCHASTIC_SOLVERS:
            step_noise["variance_noise"] = (loop.noise_fn or torch.randn_like)(x).float()
        x = scheduler.step(prediction.float(), timestep, x.float(), **step_noise).prev_sample.to(noise.dtype)
    return x
