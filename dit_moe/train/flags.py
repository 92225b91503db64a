"""The trainer's command line, generated from the sections' fields: every field is a flag in both
spellings (`--num-experts`, `--num_experts`), its trailing comment the --help, plus the flag names of
DiT, fast-DiT and DiT-MoE."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import types
import typing
from typing import Any, Optional

from ..cli import flag, parse_bool, parse_optional_int_list
from ..data import DataConfig
from ..data.config import DATASETS
from ..diffusion.config import NOISE_SCHEDULES, OBJECTIVES, ObjectiveConfig
from ..models import DiT_models, DiTConfig, MoEArgs
from ..models.config import ATTENTION_BACKENDS, EXPERT_TYPES, GROUPED_GEMM_MODES, ROUTERS
from .batch import RESUME_BATCH_RULE
from .sections import AUTO_FIELDS, SECTIONS, ModelChoice, RunSection

# Flags whose values are a fixed set, listed in their --help (the sections check them, with a sentence on how to fix).
FIELD_CHOICES = {
    "model": tuple(DiT_models),
    "dataset": ("auto", *DATASETS),
    "router": ROUTERS,
    "expert_type": EXPERT_TYPES,
    "attn_backend": ATTENTION_BACKENDS,
    "grouped_gemm": GROUPED_GEMM_MODES,
    "objective": OBJECTIVES,
    "noise_schedule": NOISE_SCHEDULES,
    "precision": ("auto", "fp32", "bf16", "fp16"),
}
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
    for section in SECTIONS:
        add_section_flags(parser.add_argument_group(section), section)
    _add_aliases(parser.add_argument_group("DiT-MoE spellings"))
    return parser


def add_section_flags(group: argparse._ArgumentGroup, section: str, only: Optional[tuple[str, ...]] = None) -> None:
    """The trainer's flags of one config section (or of its fields `only`), each stored as `<section>.<field>`:
    every tool that takes the trainer's flags (`python -m dit_moe.plan`) parses them exactly as it does."""
    cls = SECTIONS[section]
    hints = typing.get_type_hints(cls)
    comments = _section_help(section)
    for f in dataclasses.fields(cls):
        if only is not None and f.name not in only:
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        group.add_argument(
            *flag(f.name),
            dest=f"{section}.{f.name}",
            type=_field_parser(hints[f.name]),
            default=argparse.SUPPRESS,
            metavar=f.name.upper(),
            help=_flag_help(comments.get(f.name, ""), default, FIELD_CHOICES.get(f.name)),
        )


def _flag_help(comment: str, default: Any, choices: Optional[tuple[str, ...]]) -> str:
    listed = f" [choices: {', '.join(choices)}]" if choices else ""
    return f"{comment}{listed} (default: {default})".lstrip()


# DiT's, fast-DiT's and DiT-MoE's names for fields of the sections: (flag, dest, type, help).
ALIASES = (
    ("train-batch-size", "run.micro_batch_size", int, "per-process micro batch (DiT-MoE's meaning)"),
    ("accum-iter", "run.grad_accum_steps", int, "gradient accumulation steps (DiT-MoE's name)"),
    ("global-seed", "run.seed", int, "DiT's spelling of --seed"),
    ("feature-path", "data.features_path", str, "fast-DiT's spelling of --features-path"),
    (
        "vae",
        "data.vae_path",
        str,
        "DiT's flag, the same as --vae-path: ema|mse (stabilityai/sd-vae-ft-ema|mse, fetched once into the "
        "Hugging Face cache), a hub id, a local AutoencoderKL folder or 'none'",
    ),
)


def _add_aliases(aliases: argparse._ArgumentGroup) -> None:
    """DiT's, fast-DiT's and DiT-MoE's flag names for fields of the sections."""
    for name, dest, kind, text in ALIASES:
        aliases.add_argument(*flag(name), dest=dest, type=kind, default=argparse.SUPPRESS, help=text)
    aliases.add_argument(
        "--rf",
        dest="rf",
        type=parse_bool,
        nargs="?",
        const=True,
        default=argparse.SUPPRESS,
        help="rectified flow (same as --objective flow); --rf False keeps IDDPM",
    )
