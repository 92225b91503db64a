"""The diffusers scheduler that samples a checkpoint the way sample.py's default sampler does.

- IDDPM: `DDPMScheduler` on the training schedule (DDPM's linear betas stretched to T steps as
  IDDPM stretches them, or the cosine schedule, diffusers' "squaredcos_cap_v2"), epsilon
  prediction, no clipping (sample.py's clip_denoised=False), and for learned-sigma models
  `variance_type="learned_range"`, IDDPM's interpolation between the posterior variance and beta;
  fixed variance models use beta ("fixed_large", IDDPM's FIXED_LARGE). With the pipeline's
  respaced timesteps it is sample.py's `--sampler ddpm` step for step.
- Flow: `FlowMatchEulerDiscreteScheduler` without shift: Euler on the straight path, sample.py's
  `--sampler euler` with the pipeline's uniform sigmas.
"""

from __future__ import annotations

from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

from ..diffusion import ObjectiveConfig

REFERENCE_STEPS = 1000  # DDPM's linear schedule is 1e-4..2e-2 over 1000 steps; IDDPM rescales it to T
FLOW_TRAIN_TIMESTEPS = 1000  # diffusers' flow schedulers count timesteps as sigma * this


def scheduler_for(objective: ObjectiveConfig, learn_sigma: bool):
    """A fresh scheduler for a model trained with `objective` (module docstring)."""
    if objective.objective == "flow":
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=FLOW_TRAIN_TIMESTEPS, shift=1.0)
    steps = objective.diffusion_steps
    if objective.noise_schedule == "linear":
        scale = REFERENCE_STEPS / steps
        schedule = dict(beta_schedule="linear", beta_start=1e-4 * scale, beta_end=0.02 * scale)
    else:
        schedule = dict(beta_schedule="squaredcos_cap_v2")
    return DDPMScheduler(
        num_train_timesteps=steps,
        **schedule,
        variance_type="learned_range" if learn_sigma else "fixed_large",
        clip_sample=False,
        prediction_type="epsilon",
        timestep_spacing="linspace",
    )
