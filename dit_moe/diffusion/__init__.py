"""Diffusion objectives (IDDPM, rectified flow), their samplers, timestep strategies and guidance.

from dit_moe.diffusion import create_diffusion, build_objective, guided
"""

from .config import ObjectiveConfig
from .diffusers_schedulers import SOLVERS, build_scheduler, model_timestep
from .flow import RectifiedFlow
from .gaussian import GaussianDiffusion, create_diffusion, space_timesteps
from .guidance import guided
from .objective import Draws, DrawSpec, Objective, build_objective
from .samplers import SAMPLERS, ddim, ddpm, euler, heun
from .timesteps import (
    LogitNormalTimesteps,
    LossSecondMomentTimesteps,
    SpeeDiTTimesteps,
    SpeeDTimesteps,
    TimestepSampler,
    UniformFlowTimesteps,
    UniformIndexTimesteps,
)

__all__ = [
    "create_diffusion",
    "GaussianDiffusion",
    "space_timesteps",
    "RectifiedFlow",
    "Objective",
    "ObjectiveConfig",
    "DrawSpec",
    "Draws",
    "build_objective",
    "guided",
    "SOLVERS",
    "build_scheduler",
    "model_timestep",
    "SAMPLERS",
    "ddpm",
    "ddim",
    "euler",
    "heun",
    "TimestepSampler",
    "UniformIndexTimesteps",
    "SpeeDiTTimesteps",
    "SpeeDTimesteps",
    "LossSecondMomentTimesteps",
    "LogitNormalTimesteps",
    "UniformFlowTimesteps",
]
