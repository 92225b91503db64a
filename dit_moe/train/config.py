"""Experiment configuration: dataclasses loaded from YAML, overridden from the command line.

Every field of every section is also a command-line flag (`--num-experts` and `--num_experts`
both work); DiT-MoE's flags keep their meaning, with two fixes: booleans parse as booleans
(`--rf False` is False) and `--train_batch_size` is, as in DiT-MoE, the per-GPU micro batch.
The DeepSpeed JSON holds engine settings (ZeRO stage, precision, optimizer); batch sizes come
from here and are reconciled once with the world size (`BatchPlan`).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from ..cli import flag, parse_bool, parse_optional_int_list
from ..data import DataConfig
from ..diffusion.config import ObjectiveConfig
from ..hub import resolve_vae
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
# Model options that change training, not weights: an --init-from run takes them from the flags.
TRAINING_FIELDS = (
    "grad_checkpointing",
    "attn_backend",
    "grouped_gemm",
    "aux_loss_coef",
    "aux_loss_per_sample",
    "z_loss_coef",
    "capacity_factor",
    "class_dropout_prob",
)


@dataclass
class ModelChoice:
    """The model section's own fields; `ModelSection` adds every DiTConfig / MoEArgs field to them."""

    model: str = "DiT-S/2"  # registry name, e.g. "DiT-XL/2"; "DiT-T/2" for laptops
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
    deepspeed_config: str = "config/zero2.json"
    precision: str = "auto"  # auto: the DeepSpeed config's on GPU, fp32 on CPU; fp32|bf16|fp16
    global_batch_size: Optional[int] = None  # micro x accumulation x world size
    micro_batch_size: Optional[int] = None  # per process; DiT-MoE's --train_batch_size
    grad_accum_steps: Optional[int] = None
    lr: Optional[float] = None  # overrides the DeepSpeed config's optimizer lr
    max_steps: Optional[int] = None  # optimizer steps; takes precedence over epochs
    epochs: int = 1400
    log_every: int = 100
    ckpt_every: int = 10_000
    keep_last: int = 3  # checkpoints kept on disk
    ema_decay: float = 0.9999
    # updates that use the ramp min(ema_decay, (1 + step) / (10 + step)) before the constant decay; the ramp
    # reaches 0.9999 by step ~90,000 by itself, so the default ramps throughout; 0: DiT's constant decay
    ema_warmup_steps: int = 100_000
    seed: int = 0
    results_dir: str = "results"
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

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save_yaml(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


SECTIONS = {"model": ModelSection, "data": DataConfig, "objective": ObjectiveConfig, "run": RunSection}
# Where each section's fields are declared, for their --help text (the trailing comments there).
FIELD_SOURCES = {
    "model": (ModelChoice, DiTConfig, MoEArgs),
    "data": (DataConfig,),
    "objective": (ObjectiveConfig,),
    "run": (RunSection,),
}


def _field_parser(annotation: Any):
    """argparse `type=` for a dataclass field annotation (resolved type hints)."""
    origin = typing.get_origin(annotation)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if origin in (typing.Union, types.UnionType) and len(args) == 1:
        inner = _field_parser(args[0])
        if args[0] is str:
            return str  # "none" is a meaningful string (e.g. --vae-path none), not a missing value

        def optional(text: str):
            return None if text.strip().lower() == "none" else inner(text)

        return optional
    if annotation is bool:
        return parse_bool
    if origin is list:
        return parse_optional_int_list
    return annotation


def field_comments(cls: type) -> dict[str, str]:
    """Each field's trailing `# comment` in the class source: the flag's --help, written once beside its default."""
    pattern = re.compile(r"^\s+(\w+):[^#]*#\s*(.+)$")
    return {m.group(1): m.group(2).strip() for m in map(pattern.match, inspect.getsource(cls).splitlines()) if m}


def _section_help(section: str) -> dict[str, str]:
    """Each field's --help: its trailing comment, plus the rules that decide a default or a resume's batch."""
    comments = {k: v for source in FIELD_SOURCES[section] for k, v in field_comments(source).items()}
    if section == "model":
        comments.update({k: f"{comments.get(k, '')}; {rule}" for k, rule in AUTO_FIELDS.items()})
    if section == "run":
        comments["resume"] = f"{comments['resume']}; {RESUME_BATCH_RULE}"
    return comments


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train a DiT / DiT-MoE with DeepSpeed.",
    )
    parser.add_argument("--config", help="experiment YAML (sections model/data/objective/run); flags override it")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--deepspeed", action="store_true", help=argparse.SUPPRESS)
    for section, cls in SECTIONS.items():
        group = parser.add_argument_group(section)
        hints = typing.get_type_hints(cls)
        comments = _section_help(section)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else None
            group.add_argument(
                *flag(f.name),
                dest=f"{section}.{f.name}",
                type=_field_parser(hints[f.name]),
                default=argparse.SUPPRESS,
                metavar=f.name.upper(),
                help=f"{comments.get(f.name, '')} (default: {default})".lstrip(),
            )
    _add_aliases(parser.add_argument_group("DiT-MoE spellings"))
    return parser


def _add_aliases(aliases: argparse._ArgumentGroup) -> None:
    """DiT's, fast-DiT's and DiT-MoE's flag names for fields of the sections."""
    aliases.add_argument(
        "--train_batch_size",
        "--train-batch-size",
        dest="run.micro_batch_size",
        type=int,
        default=argparse.SUPPRESS,
        help="per-process micro batch (DiT-MoE's meaning)",
    )
    aliases.add_argument(
        "--accum_iter",
        "--accum-iter",
        dest="run.grad_accum_steps",
        type=int,
        default=argparse.SUPPRESS,
        help="gradient accumulation steps (DiT-MoE's name)",
    )
    aliases.add_argument("--global-seed", "--global_seed", dest="run.seed", type=int, default=argparse.SUPPRESS)
    aliases.add_argument(
        "--vae",
        dest="data.vae_path",
        default=argparse.SUPPRESS,
        help="DiT's flag, the same as --vae-path: ema|mse (stabilityai/sd-vae-ft-ema|mse, fetched "
        "once into the Hugging Face cache), a hub id, a local AutoencoderKL folder or 'none'",
    )
    aliases.add_argument(
        "--feature-path",
        "--feature_path",
        dest="data.features_path",
        default=argparse.SUPPRESS,
        help="fast-DiT's spelling of --features-path",
    )
    aliases.add_argument(
        "--rf",
        dest="rf",
        type=parse_bool,
        nargs="?",
        const=True,
        default=argparse.SUPPRESS,
        help="rectified flow (same as --objective flow); --rf False keeps IDDPM",
    )


def _type_name(hint: Any) -> str:
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    if typing.get_origin(hint) is list:
        return "a list of integers such as [1, 3]"
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def _yaml_value(value: Any, hint: Any, where: str) -> Any:
    """`value` as the field type `hint` wants (ints are numbers too; YAML 1.1 reads 1e-3 as a
    string, so numeric strings count as numbers); a wrong type raises one sentence naming `where`."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return None if value is None else _yaml_value(value, args[0], where)
    if hint is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    fits = {
        bool: lambda v: isinstance(v, bool),
        str: lambda v: isinstance(v, str),
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    }
    if typing.get_origin(hint) is list:
        ok = isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    else:
        ok = fits.get(hint, lambda v: True)(value)
    if not ok:
        raise ValueError(f"{where}: expected {_type_name(hint)}, got {value!r}; fix the value in the file.")
    return float(value) if hint is float else value


def _read_yaml(path: str) -> dict[str, Any]:
    """The experiment file's mapping; a missing file or a syntax error is one sentence with its line."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(
            f"--config {path} does not exist; pass an experiment YAML such as config/quickstart.yaml."
        )
    try:
        raw = yaml.safe_load(file.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or "invalid YAML"
        raise ValueError(f"{path}: YAML syntax error{line} ({problem}); fix the file.") from None
    if raw is not None and not isinstance(raw, dict):
        raise ValueError(f"{path}: expected sections {sorted(SECTIONS)} at the top level, got {type(raw).__name__}.")
    return raw or {}


def _yaml_sections(path: str) -> dict[str, dict[str, Any]]:
    """Each section's values from the experiment file, keys and types checked against its dataclass."""
    raw = _read_yaml(path)
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ValueError(f"{path}: unknown sections {unknown}; use {sorted(SECTIONS)}.")
    sections = {}
    for name, section_values in raw.items():
        section_values = section_values or {}
        if not isinstance(section_values, dict):
            raise ValueError(f"{path} [{name}]: expected key: value lines, got {section_values!r}.")
        hints = typing.get_type_hints(SECTIONS[name])
        unknown = sorted(set(section_values) - set(hints))
        if unknown:
            raise ValueError(f"{path} [{name}]: unknown keys {unknown}; valid keys are {sorted(hints)}.")
        sections[name] = {
            key: _yaml_value(value, hints[key], f"{path} [{name}] {key}") for key, value in section_values.items()
        }
    return sections


def load_config(argv: Optional[list[str]] = None) -> TrainConfig:
    """Defaults <- YAML (--config) <- command-line flags; each section is built (and validated) once."""
    args = vars(build_parser().parse_args(argv))
    values: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    if args.get("config"):
        for name, section_values in _yaml_sections(args["config"]).items():
            values[name].update(section_values)
    for dest, value in args.items():
        if "." in dest:
            section, key = dest.split(".", 1)
            values[section][key] = value
    if "rf" in args:
        values["objective"]["objective"] = "flow" if args["rf"] else "iddpm"
    if "vae_path" in values["data"]:  # a VAE named by DiT's ema/mse or a hub id: its cached folder
        values["data"]["vae_path"] = resolve_vae(values["data"]["vae_path"])
    return TrainConfig(**{name: SECTIONS[name](**values[name]) for name in SECTIONS})


RESUME_BATCH_RULE = (
    "on another number of processes the global batch stays the checkpoint's: the micro batch and accumulation "
    "flags are used if given (their product with the processes must be that batch), else the accumulation is kept "
    "and micro = global / (accumulation x processes), else the smallest larger accumulation that divides; "
    "a number of processes that does not divide the global batch stops"
)


@dataclass(frozen=True)
class BatchPlan:
    """micro_batch x grad_accum x world_size == global_batch, reconciled once at start-up."""

    micro_batch: int
    grad_accum: int
    world_size: int

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.world_size

    @classmethod
    def resolve(cls, run: RunSection, world_size: int, ds_config: dict[str, Any]) -> "BatchPlan":
        """Fill in whichever of micro/accum/global is missing (from flags, then the DeepSpeed JSON)."""
        micro = run.micro_batch_size or ds_config.get("train_micro_batch_size_per_gpu")
        accum = run.grad_accum_steps or ds_config.get("gradient_accumulation_steps")
        total = run.global_batch_size or ds_config.get("train_batch_size")
        if micro is None and total is None:
            raise ValueError("Set a batch size: --global-batch-size N or --train_batch_size N (per process).")
        if micro is None:
            accum = accum or 1
            if total % (accum * world_size):
                raise ValueError(
                    f"Global batch {total} is not divisible by grad accumulation {accum} x world size {world_size}; "
                    f"choose a global batch that is a multiple of {accum * world_size}."
                )
            micro = total // (accum * world_size)
        elif accum is None:
            if total is None:
                accum = 1
            elif total % (micro * world_size):
                raise ValueError(
                    f"Global batch {total} is not divisible by micro batch {micro} x world size {world_size}; "
                    f"choose a global batch that is a multiple of {micro * world_size}."
                )
            else:
                accum = total // (micro * world_size)
        plan = cls(int(micro), int(accum), world_size)
        if total is not None and plan.global_batch != total:
            raise ValueError(
                f"Batch sizes disagree: micro batch {micro} x grad accumulation {accum} x world size {world_size} "
                f"= {plan.global_batch}, but the global batch is {total}."
            )
        if plan.micro_batch < 1 or plan.grad_accum < 1:
            raise ValueError(f"Global batch {total} is too small for world size {world_size}.")
        return plan

    @classmethod
    def for_resume(cls, run: RunSection, world_size: int, global_batch: int, grad_accum: int) -> "BatchPlan":
        """The plan that continues a checkpoint's `global_batch` on `world_size` processes (`RESUME_BATCH_RULE`).

        Keeping the accumulation keeps the global micro-batch, whose samples, noise and timesteps are
        drawn per (step, micro-step): the resumed steps are then those of the uninterrupted run.
        """
        if run.global_batch_size not in (None, global_batch):
            raise ValueError(
                f"The checkpoint continues global batch {global_batch}, not --global-batch-size "
                f"{run.global_batch_size}; drop the flag, or start a new run from its weights with --init-from."
            )
        if global_batch % world_size:
            raise ValueError(
                f"The checkpoint's global batch {global_batch} cannot be split over {world_size} processes; resume "
                f"on a number of processes that divides {global_batch}."
            )
        if run.micro_batch_size or run.grad_accum_steps:
            return cls.resolve(dataclasses.replace(run, global_batch_size=global_batch), world_size, {})
        per_process = global_batch // world_size
        accum = next(a for a in range(min(grad_accum, per_process), per_process + 1) if per_process % a == 0)
        return cls(per_process // accum, accum, world_size)
