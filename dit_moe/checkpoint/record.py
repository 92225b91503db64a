"""What a checkpoint records is the truth of the run that wrote it.

A run that continues a checkpoint (--resume), starts from one (--init-from), exports one
(--export-only) or samples one takes the recorded architecture and objective. A flag may repeat a
recorded value; one that contradicts it stops with one sentence naming both values and the way to
start a new run instead. Only the fields in `TRAINING_ONLY_FIELDS` (how a model trains, not what its
weights compute) and run options such as the learning rate are the flags' to change.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

from ..models import DiTConfig, preset_config, preset_name
from ..models.config import TRAINING_ONLY_FIELDS
from ..utils.errors import UserError
from . import layout
from .infer import infer_config
from .provenance import TrainedAs
from .read import CheckpointContents, parse_configs

PRESET_SHAPE_FIELDS = ("depth", "hidden_size", "num_heads", "patch_size")  # what a registry name fixes


@dataclass(frozen=True)
class Contradiction:
    """A flag's value that differs from the one the checkpoint records."""

    name: str
    asked: Any
    recorded: Any

    def __str__(self) -> str:
        if self.name == "objective":  # DiT-MoE users say it with --rf
            return f"--objective {self.asked} (--rf {self.asked == 'flow'}; it records {self.recorded})"
        return f"{_flag(self.name, self.asked)} (it records {self.recorded})"


@dataclass(frozen=True)
class RecordedRun:
    """The architecture and objective a checkpoint records, and where it is, for messages."""

    where: str  # e.g. "checkpoint results/run/checkpoints/step0000400"
    model: Optional[DiTConfig]  # None: the file records no model config
    trained_as: TrainedAs
    run: Mapping[str, Any] = field(default_factory=dict)  # a tag's run record: VAE, EMA settings (may be empty)

    @property
    def preset(self) -> Optional[str]:
        """The registry name of the recorded architecture, or None for a custom shape or no config."""
        return preset_name(self.model) if self.model is not None else None

    def pinned(self) -> dict[str, Any]:
        """Flat name -> recorded value of everything a flag may not change."""
        values: dict[str, Any] = {}
        if self.model is not None:
            values.update({k: v for k, v in self.model.flat_dict().items() if k not in TRAINING_ONLY_FIELDS})
        return {**values, **self._recorded_objective()}

    def _recorded_objective(self) -> dict[str, Any]:
        """Field -> value of the objective settings the file pins down (none when it records no objective)."""
        objective = self.trained_as.objective
        return {k: getattr(objective, k) for k in self.trained_as.known_fields()} if objective is not None else {}

    def contradictions(self, asked: Mapping[str, Any]) -> list[Contradiction]:
        """The asked values (flat name -> value, only what the user set) that differ from the record."""
        pinned = self.pinned()
        found = []
        if self.model is not None and asked.get("model") not in (None, self.preset):
            # the preset's shape with the flags' own overrides (DiT-S/2 --hidden-size 256 repeats a custom run)
            described = {**preset_config(asked["model"]).flat_dict(), **asked}
            if any(described[k] != pinned[k] for k in PRESET_SHAPE_FIELDS):
                found = [Contradiction("model", asked["model"], self.preset or "a custom architecture")]
        return found + [Contradiction(k, v, pinned[k]) for k, v in asked.items() if k in pinned and v != pinned[k]]

    def unstated_objective(self, defaults: Mapping[str, Any], asked: Mapping[str, Any], instead: str) -> None:
        """Stop when the recorded objective differs from what the flags would train by default and no flag
        states it. The objective is the one part of a run its weights do not fix: continued under another
        one, training goes on without an error (the shapes match) and the loss curve jumps, so a command
        that continues training must say it (DiT-MoE's scripts pass --rf every time)."""
        recorded = self._recorded_objective()
        missing = {k: v for k, v in recorded.items() if k not in asked and defaults.get(k, v) != v}
        if missing:
            flags = " ".join(_flag(k, v) for k, v in missing.items())
            raise UserError(
                f"{self.where} was trained with {flags}, which this command does not say (its flags would train "
                f"{', '.join(_flag(k, defaults[k]) for k in missing)}): add {flags} to continue it, or {instead}."
            )

    def check_vae(self, codec: Optional[Mapping[str, Any]], instead: str) -> Optional[str]:
        """Stop when the run's latents would be scaled by another factor than the recorded one (the model
        would see inputs of another variance); return a warning when only the VAE's path differs (the same
        VAE may live elsewhere on another cluster). `codec` is the flags' {"path", "scale_factor"} or None."""
        if "vae" not in self.run:
            return None
        recorded = self.run["vae"]
        if (recorded is None) != (codec is None):
            raise UserError(
                f"{self.where} was trained on {_inputs(recorded)}, this command gives {_inputs(codec)}; {instead}."
            )
        if recorded is None:  # pixels, as the flags say
            return None
        if recorded["scale_factor"] != codec["scale_factor"]:
            raise UserError(
                f"--vae-scale-factor {codec['scale_factor']} (it records {recorded['scale_factor']}): {self.where}'s "
                f"latents were scaled by {recorded['scale_factor']}; drop the flag, or {instead}."
            )
        if str(recorded["path"]) != str(codec["path"]):
            return (
                f"{self.where} was trained with the VAE at {recorded['path']}; this run encodes with {codec['path']}."
            )
        return None

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


def _inputs(vae: Optional[Mapping[str, Any]]) -> str:
    return "pixels" if vae is None else f"latents of the VAE at {vae['path']}"


def _flag(name: str, value: Any) -> str:
    """How a user writes one objective value on the command line (the objective as DiT-MoE's --rf)."""
    if name == "objective":
        return f"--rf {value == 'flow'}"
    return f"--{name.replace('_', '-')} {value}"


def record_of_tag(tag_dir: Path) -> RecordedRun:
    """What a training checkpoint's tag records, read from its config files alone (no weights)."""
    model, trained_as = parse_configs(layout.read_model_config(tag_dir), layout.read_objective_config(tag_dir), {})
    return RecordedRun(f"checkpoint {tag_dir}", model, trained_as, layout.read_run_record(tag_dir))


def record_of_contents(contents: CheckpointContents, where: str) -> RecordedRun:
    """What a read checkpoint records; a file without a model config is described by its tensor shapes."""
    model = contents.model_config or infer_config(contents.state_dict)
    return RecordedRun(where, model, contents.trained_as)
