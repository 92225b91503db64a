"""How a checkpoint was trained, as far as the file says: one typed value that every reader
(sampling, --init-from, resume, upcycling) asks, instead of each judging the file again."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Optional

from ..diffusion import ObjectiveConfig


class ObjectiveSource(str, enum.Enum):
    """Where a file's objective comes from."""

    RECORDED = "recorded"  # the file stores the whole ObjectiveConfig
    LEGACY = "legacy"  # written before the ObjectiveConfig: objective and flow time scale only
    KEYS = "keys"  # none stored; judged from which reference's key layout the file has
    UNKNOWN = "unknown"  # none stored and the keys are not conclusive


# The ObjectiveConfig fields each source pins down (IDDPM's schedule only when the whole config is stored).
_KNOWN_FIELDS = {
    ObjectiveSource.RECORDED: ("objective", "flow_t_scale", "noise_schedule", "diffusion_steps"),
    ObjectiveSource.LEGACY: ("objective", "flow_t_scale"),
    ObjectiveSource.KEYS: ("objective", "flow_t_scale"),
    ObjectiveSource.UNKNOWN: (),
}


@dataclass(frozen=True)
class TrainedAs:
    """A file's objective (recorded or judged from its keys; None: unknown) and where that comes from."""

    objective: Optional[ObjectiveConfig]
    source: ObjectiveSource
    evidence: str = ""  # for KEYS and UNKNOWN: what the keys showed, for messages

    @property
    def recorded(self) -> Optional[ObjectiveConfig]:
        """The objective the file itself records, else None."""
        return self.objective if self.source in (ObjectiveSource.RECORDED, ObjectiveSource.LEGACY) else None

    @property
    def judged(self) -> Optional[ObjectiveConfig]:
        """The objective judged from the file's keys (it records none), else None."""
        return self.objective if self.source is ObjectiveSource.KEYS else None

    @property
    def describe(self) -> str:
        """Where the objective comes from, for messages."""
        if self.recorded is not None:
            return "recorded in the file"
        return f"judged from {self.evidence}" if self.evidence else "unknown"

    def known_fields(self) -> tuple[str, ...]:
        """The ObjectiveConfig fields the file pins down; a run or sampler may not contradict them."""
        fields = _KNOWN_FIELDS[self.source]
        if self.objective is not None and self.objective.objective == "iddpm":
            fields = tuple(f for f in fields if f != "flow_t_scale")
        return fields
