"""How a model is trained and therefore how it must be sampled: `ObjectiveConfig`.

Saved beside the model config in every export and checkpoint, and read back by every sampling
tool and by `--init-from`, so a model trained with `--noise-schedule cosine` or rectified flow
is sampled that way without repeating the flags. The flags remain for files that record none
(official DiT and feizc/DiT-MoE checkpoints).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .gaussian import NOISE_SCHEDULES
from .timesteps import CONTINUOUS_SAMPLERS, DISCRETE_SAMPLERS

OBJECTIVES = ("iddpm", "flow")
DEFAULT_TIMESTEP_SAMPLERS = {"iddpm": "uniform", "flow": "logit-normal"}


@dataclass
class ObjectiveConfig:
    """The training objective and everything its samplers need to invert it."""

    objective: str = "iddpm"  # "iddpm" (DiT) or "flow" (rectified flow, DiT-MoE's --rf True)
    noise_schedule: str = "linear"  # IDDPM beta schedule: "linear" (DiT) or "cosine"
    diffusion_steps: int = 1000  # IDDPM training steps
    timestep_sampler: str = "auto"  # auto: uniform (iddpm) / logit-normal (flow); iddpm: uniform, speedit, speed, loss-second-moment; flow: logit-normal, uniform
    flow_t_scale: float = 1.0  # DiT-MoE feeds raw t in (0, 1); 1000 matches the embedder range

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be 'iddpm' or 'flow', got {self.objective!r}.")
        if self.noise_schedule not in NOISE_SCHEDULES:
            raise ValueError(f"noise_schedule must be one of {NOISE_SCHEDULES}, got {self.noise_schedule!r}.")
        if self.diffusion_steps < 1:
            raise ValueError(f"diffusion_steps must be >= 1, got {self.diffusion_steps}.")
        allowed = DISCRETE_SAMPLERS if self.objective == "iddpm" else CONTINUOUS_SAMPLERS
        if self.timestep_sampler not in ("auto", *allowed):
            raise ValueError(
                f"timestep_sampler {self.timestep_sampler!r} does not fit the {self.objective} objective; "
                f"use auto or one of {', '.join(allowed)}."
            )

    def resolved(self) -> "ObjectiveConfig":
        """This config with `timestep_sampler` "auto" replaced by the objective's default (what is saved)."""
        if self.timestep_sampler != "auto":
            return self
        return dataclasses.replace(self, timestep_sampler=DEFAULT_TIMESTEP_SAMPLERS[self.objective])

    def build_options(self, learn_sigma: bool) -> dict[str, Any]:
        """Keyword options of `build_objective(self.objective, ...)` for a model with `learn_sigma`."""
        sampler = self.resolved().timestep_sampler
        if self.objective == "iddpm":
            return dict(
                noise_schedule=self.noise_schedule,
                diffusion_steps=self.diffusion_steps,
                learn_sigma=learn_sigma,
                timestep_sampler=sampler,
            )
        return dict(learn_sigma=learn_sigma, t_scale=self.flow_t_scale, timestep_sampler=sampler)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ObjectiveConfig":
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"Unknown objective config keys {unknown}; this file was written by a newer dit-moe.")
        return cls(**values)
