"""Experiment configuration: defaults <- the YAML (`--config`) <- command-line flags, built once.

Every field of every section is also a command-line flag (`--num-experts` and `--num_experts`
both work); DiT-MoE's flags keep their meaning, with two fixes: booleans parse as booleans
(`--rf False` is False) and `--train_batch_size` is, as in DiT-MoE, the per-GPU micro batch.
The DeepSpeed JSON holds engine settings (ZeRO stage, precision, optimizer); batch sizes come
from here and are reconciled once with the world size (`dit_moe.train.batch.BatchPlan`).

Where things live: `sections` (the dataclasses), `flags` (the generated parser), `yaml_file` (the
experiment file), `batch` (BatchPlan); `load_config` here joins them.
"""

from __future__ import annotations

from typing import Any, Optional

from ..hub import resolve_vae
from .batch import BatchPlan
from .flags import build_parser
from .sections import SECTIONS, RunSection, TrainConfig
from .yaml_file import read_sections

__all__ = ["BatchPlan", "RunSection", "TrainConfig", "build_parser", "load_config"]


def load_config(argv: Optional[list[str]] = None) -> TrainConfig:
    """Defaults <- YAML (--config) <- command-line flags; each section is built (and validated) once."""
    args = vars(build_parser().parse_args(argv))
    values: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    if args.get("config"):
        for name, section_values in read_sections(args["config"]).items():
            values[name].update(section_values)
    for dest, value in args.items():
        if "." in dest:
            section, key = dest.split(".", 1)
            values[section][key] = value
    if "rf" in args:
        values["objective"]["objective"] = "flow" if args["rf"] else "iddpm"
    if "vae_path" in values["data"]:  # a VAE named by DiT's ema/mse or a hub id: its cached folder
        values["data"]["vae_path"] = resolve_vae(values["data"]["vae_path"])
    given = frozenset(f"{section}.{key}" for section, keys in values.items() for key in keys)
    return TrainConfig(**{name: SECTIONS[name](**values[name]) for name in SECTIONS}, given=given)
