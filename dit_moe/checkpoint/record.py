"""What a checkpoint records is the truth of the run that wrote it.

A run that continues a checkpoint (--resume), starts from one (--init-from), exports one
(--export-only) or samples one takes the recorded architecture and objective. A flag may repeat a
recorded value; one that contradicts it stops with one sentence naming both values and the way to
start a new run instead. Only the fields in `TRAINING_ONLY_FIELDS` (how a model trains, not what its
weights compute) and run options such as the learning rate are the flags' to change.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

from ..models import DiTConfig, preset_name
from ..models.config import TRAINING_ONLY_FIELDS
from ..utils.errors import UserError
from . import layout
from .infer import infer_config
from .provenance import TrainedAs
from .read import CheckpointContents, parse_configs


@dataclass(frozen=True)
class Contradiction:
    """A flag's value that differs from the one the checkpoint records."""

    name: str
    asked: Any
    recorded: Any

    def __str__(self) -> str:
        if self.name == "objective":  # DiT-MoE users say it with --rf
            return f"--objective {self.asked} (--rf {self.asked == 'flow'}; it records {self.recorded})"
        return f"--{self.name.replace('_', '-')} {self.asked} (it records {self.recorded})"


@dataclass(frozen=True)
class RecordedRun:
    """The architecture and objective a checkpoint records, and where it is, for messages."""

    where: str  # e.g. "checkpoint results/run/checkpoints/step0000400"
    model: Optional[DiTConfig]  # None: the file records no model config
    trained_as: TrainedAs

    @property
    def preset(self) -> Optional[str]:
        """The registry name of the recorded architecture, or None for a custom shape or no config."""
        return preset_name(self.model) if self.model is not None else None

    def pinned(self) -> dict[str, Any]:
        """Flat name -> recorded value of everything a flag may not change."""
        values: dict[str, Any] = {}
        if self.model is not None:
            values.update({k: v for k, v in self.model.flat_dict().items() if k not in TRAINING_ONLY_FIELDS})
        if self.trained_as.objective is not None:
            values.update({k: getattr(self.trained_as.objective, k) for k in self.trained_as.known_fields()})
        return values

    def contradictions(self, asked: Mapping[str, Any]) -> list[Contradiction]:
        """The asked values (flat name -> value, only what the user set) that differ from the record."""
        pinned = self.pinned()
        if self.model is not None and asked.get("model") not in (None, self.preset):
            found = [Contradiction("model", asked["model"], self.preset or "a custom architecture")]
        else:
            found = []
        return found + [Contradiction(k, v, pinned[k]) for k, v in asked.items() if k in pinned and v != pinned[k]]

    def check(self, asked: Mapping[str, Any], instead: str) -> None:
        """Stop with one sentence when an asked value contradicts the record; `instead` says how to
        start a new run (e.g. "start a new run from its weights with --init-from DIR")."""
        found = self.contradictions(asked)
        if found:
            flags = "; ".join(map(str, found))
            raise UserError(
                f"{flags}: that is not what {self.where} was trained with; drop "
                f"{'the flag' if len(found) == 1 else 'these flags'} to use the recorded values, or {instead}."
            )


def record_of_tag(tag_dir: Path) -> RecordedRun:
    """What a training checkpoint's tag records, read from its config files alone (no weights)."""
    model, trained_as = parse_configs(layout.read_model_config(tag_dir), layout.read_objective_config(tag_dir), {})
    return RecordedRun(f"checkpoint {tag_dir}", model, trained_as)


def record_of_contents(contents: CheckpointContents, where: str) -> RecordedRun:
    """What a read checkpoint records; a file without a model config is described by its tensor shapes."""
    model = contents.model_config or infer_config(contents.state_dict)
    return RecordedRun(where, model, contents.trained_as)
