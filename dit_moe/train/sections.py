"""The experiment's sections as typed dataclasses: model (preset + every DiTConfig / MoEArgs field),
data, objective and run. Each field is declared once with its default and a trailing comment, which
`dit_moe.train.flags` turns into the flag's --help."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from ..data import DataConfig
from ..diffusion.config import ObjectiveConfig
from ..models import DiT_models, DiTConfig, MoEArgs, preset_config
from ..models.compile import check_mode as check_compile_mode

# Architecture fields the --model preset sets (None: the preset's value) and those the data sets.
PRESET_FIELDS = ("patch_size", "hidden_size", "depth", "num_heads")
DATA_FIELDS = ("input_size", "in_channels", "num_classes")
# The trainer builds DiT-MoE's 8-expert model unless told otherwise (--num-experts 0: dense DiT).
TRAINER_DEFAULTS = {"num_experts": 8}
# Fields whose trainer default depends on the model (None until `ModelChoice.architecture` decides), with
# the rule for --help. DiT-MoE's train_deepspeed.py builds its QK-norm flash block for every size; DiT has none.
AUTO_FIELDS = {"qk_norm": "default: on for MoE models (DiT-MoE's train_deepspeed.py), off for dense DiT"}


@dataclass
class ModelChoice:
    """The model section's own fields; `ModelSection` adds every DiTConfig / MoEArgs field to them."""

    model: str = "DiT-S/2"  # registry name ("DiT-T/2" for laptops); `python -m dit_moe.models` lists them
    init_from: Optional[str] = None  # weights to start from (export, upcycled model, DiT .pt)
    # MaskDiT: encoder on 1 - mask_ratio of the patches, a dense decoder over all of them.
    mask_ratio: float = 0.0  # 0: no masking (MaskDiT trains at 0.5, fine-tunes at 0)
    mae_loss_coef: float = 0.1  # weight of the MAE term on masked patches
    allow_objective_change: bool = False  # --init-from: train another objective than the file records

    def __post_init__(self) -> None:
        if self.model not in DiT_models:
            raise ValueError(f"Unknown --model {self.model!r}; choose one of {sorted(DiT_models)}.")
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"--mask-ratio must lie in [0, 1), got {self.mask_ratio}; MaskDiT uses 0.5.")
        self.architecture(input_size=32, in_channels=4, num_classes=1000)  # every architecture value, checked now

    def architecture(self, input_size: int, in_channels: int, num_classes: int) -> DiTConfig:
        """The DiTConfig of the --model preset with this section's fields, for the data's shape."""
        overrides = {name: getattr(self, name) for name in ARCHITECTURE_FIELDS}
        overrides = {k: v for k, v in overrides.items() if not (k in PRESET_FIELDS and v is None)}
        if overrides["qk_norm"] is None:
            overrides["qk_norm"] = bool(overrides["num_experts"])
        return preset_config(
            self.model, input_size=input_size, in_channels=in_channels, num_classes=num_classes, **overrides
        )


def _architecture_fields() -> list[tuple[str, Any, Any]]:
    """(name, type, field) of every DiTConfig and MoEArgs field the trainer exposes, defaults included."""
    generated = []
    for cls in (DiTConfig, MoEArgs):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name in DATA_FIELDS or f.name == "moe":
                continue
            if f.name in PRESET_FIELDS or f.name in AUTO_FIELDS:
                generated.append((f.name, Optional[hints[f.name]], field(default=None)))
            else:
                generated.append((f.name, hints[f.name], field(default=TRAINER_DEFAULTS.get(f.name, f.default))))
    return generated


_ARCHITECTURE = _architecture_fields()
ModelSection = dataclasses.make_dataclass("ModelSection", _ARCHITECTURE, bases=(ModelChoice,))
ModelSection.__doc__ = "The model: a --model preset, its overrides (every DiTConfig / MoEArgs field) and how to start."
ARCHITECTURE_FIELDS = tuple(name for name, _, _ in _ARCHITECTURE)


@dataclass
class RunSection:
    deepspeed_config: str = "config/zero2.json"  # DeepSpeed JSON: engine settings only (ZeRO, precision, AdamW)
    precision: str = "auto"  # auto: the DeepSpeed config's on GPU, fp32 on CPU; fp32|bf16|fp16
    global_batch_size: Optional[int] = None  # micro x accumulation x world size
    micro_batch_size: Optional[int] = None  # per process; DiT-MoE's --train_batch_size
    grad_accum_steps: Optional[int] = None  # micro-batches per optimizer step; None: global / (micro x world size)
    lr: Optional[float] = None  # overrides the DeepSpeed config's optimizer lr
    max_steps: Optional[int] = None  # optimizer steps; takes precedence over epochs
    epochs: int = 1400  # passes over the data when max_steps is not given (DiT: 1400)
    log_every: int = 100  # steps between metrics.jsonl / log lines
    ckpt_every: int = 10_000  # steps between checkpoints (one more is saved at the end)
    keep_last: int = 3  # checkpoints kept on disk
    ema_decay: float = 0.9999  # EMA decay per optimizer step (DiT: 0.9999)
    # The ramp reaches 0.9999 by step ~90,000 by itself, so the default ramps throughout: a short run's EMA
    # is not its starting weights (at step 500 their weight in it is below 1e-3).
    ema_warmup_steps: int = 100_000  # steps with decay min(ema_decay, (1+n)/(10+n)); 0: DiT's constant decay
    seed: int = 0  # global seed (DiT's --global-seed); every rank derives its own from it
    results_dir: str = "results"  # the run's folder: metrics, log, checkpoints, export
    resume: Optional[str] = None  # "auto": latest checkpoint in results_dir; or a checkpoint dir
    elastic_checkpoints: bool = True  # also save full optimizer state (12 B/param): resume on any shape
    overwrite: bool = False  # a fresh run may delete the run already in results_dir
    export_format: str = "safetensors"  # "safetensors" | "pt"
    export_shard_bytes: int = 5 * 10**9  # a larger safetensors export is written as Hugging Face-style shards
    export_only: bool = False  # load --resume, write the export, exit
    ep_size: int = 1  # expert-parallel group size
    compile: str = "off"  # torch.compile: "off" | "blocks" (each transformer block) | "model" (the whole forward)

    def __post_init__(self) -> None:
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ValueError(f"--precision must be auto, fp32, bf16 or fp16, got {self.precision!r}.")
        if self.export_format not in ("safetensors", "pt"):
            raise ValueError(f"--export-format must be 'safetensors' or 'pt', got {self.export_format!r}.")
        check_compile_mode(self.compile)
        for name in ("log_every", "ckpt_every", "keep_last", "ep_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}.")


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    run: RunSection = field(default_factory=RunSection)
    # "section.field" of every value the YAML or a flag set (the rest are defaults): what a checkpoint's
    # record may not be contradicted by, and may fill in.
    given: frozenset[str] = field(default=frozenset(), compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {name: dataclasses.asdict(getattr(self, name)) for name in ("model", "data", "objective", "run")}

    def asked(self, *sections: str) -> dict[str, Any]:
        """Field name -> value of what the YAML or flags set in `sections`."""
        names = [dotted.split(".", 1) for dotted in sorted(self.given)]
        return {name: getattr(getattr(self, section), name) for section, name in names if section in sections}

    def save_yaml(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


SECTIONS = {"model": ModelSection, "data": DataConfig, "objective": ObjectiveConfig, "run": RunSection}
