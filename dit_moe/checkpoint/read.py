"""Read every supported checkpoint format into weights plus whatever configs the file records.

Formats read by `load_model` / `read_checkpoint_file`:
- facebookresearch/DiT: a plain state dict (released weights) or train.py's {"model", "ema", "opt", "args"};
- feizc/DiT-MoE: the same containers with per-expert keys `blocks.N.moe.experts.K.*` (stacked at load);
- our exports (`.safetensors` or `.pt`): weights + EMA + the DiTConfig that built them and the
  ObjectiveConfig it was trained with (files written before the objective config record only
  the objective and its flow time scale, inside a flat model config: remapped here); a large
  safetensors export as Hugging Face-style shards, named by `export.safetensors` or its
  `export.safetensors.index.json`;
- DeepSpeed checkpoint directories written by our trainer: a results dir, its `checkpoints/` or a
  tag dir, resolved by `checkpoint_layout` to the latest complete tag.
Architecture is inferred from tensor shapes when the file stores no config.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import safe_open

from ..diffusion import ObjectiveConfig
from ..models import DiTConfig
from ..utils.errors import CheckpointError
from . import layout
from .export import EXPORT_FORMAT, INDEX_SUFFIX, index_path
from .infer import objective_evidence
from .provenance import ObjectiveSource, TrainedAs

_STRIP_PREFIXES = ("module.", "_orig_mod.")

torch.serialization.add_safe_globals([argparse.Namespace])


class _DeepSpeedObject:
    """Stands in for the few DeepSpeed objects a `mp_rank_*_model_states.pt` may hold beside the weights (loss
    scalers, the ZeRO stage enum, frozen-parameter fragment addresses): safe loading builds this inert object
    in their place, so reading a stranger's tag neither imports DeepSpeed nor runs any code the file names."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


DEEPSPEED_CLASSES = (  # the only classes DeepSpeed's checkpoint files hold beside tensors and containers
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)
DEEPSPEED_GLOBALS = [(_DeepSpeedObject, name) for name in DEEPSPEED_CLASSES]


@dataclass
class CheckpointContents:
    """What one read of a checkpoint gives: weights and whatever configs the file records."""

    state_dict: dict[str, torch.Tensor]
    model_config: Optional[DiTConfig]  # None: the file records none (infer_config rebuilds it)
    trained_as: TrainedAs  # the objective, recorded or judged from the keys, and where it comes from
    # A trainer's export: {"step", "source_tag", "vae": {"path", "scale_factor"}}; {} for other files.
    run: dict[str, Any] = field(default_factory=dict)


def parse_configs(
    model: Optional[dict], objective: Optional[dict], state_dict: dict[str, torch.Tensor]
) -> tuple[Optional[DiTConfig], TrainedAs]:
    """(model config, how the file was trained) from the stored dicts (the old flat layout included),
    or for a file that records no objective, from its keys (`objective_evidence`)."""
    config = DiTConfig.from_dict(model) if model is not None else None
    if objective is not None:
        return config, TrainedAs(ObjectiveConfig.from_dict(objective), ObjectiveSource.RECORDED)
    if model is not None and "moe" not in model:  # the flat layout recorded the objective inside the model config
        legacy = ObjectiveConfig(objective=model.get("objective", "iddpm"), flow_t_scale=model.get("flow_t_scale", 1.0))
        return config, TrainedAs(legacy, ObjectiveSource.LEGACY)
    judged, evidence = objective_evidence(state_dict)
    source = ObjectiveSource.KEYS if judged is not None else ObjectiveSource.UNKNOWN
    return config, TrainedAs(judged, source, evidence)


def _clean_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    cleaned = {}
    for key, value in state_dict.items():
        for prefix in _STRIP_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
        cleaned[key] = value
    return cleaned


def safe_torch_load(path: Path, map_location: Any = "cpu", allowed: Optional[list] = None) -> Any:
    """torch.load with weights_only=True: tensors and plain containers, never arbitrary objects; `allowed`
    (default: inert stand-ins for DeepSpeed's few classes) are the only classes the file may name."""
    try:
        with torch.serialization.safe_globals(DEEPSPEED_GLOBALS if allowed is None else allowed):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        refused = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
        if refused is None:  # not a pickle at all, or a damaged one
            raise CheckpointError(f"{path} could not be read as a PyTorch checkpoint (not a valid pickle).") from None
        what = f"a {refused.group(1)} object"
        raise CheckpointError(
            f"{path} holds {what}, which safe loading (weights_only) refuses to unpickle; if you trust the file, "
            "re-save its state dict with torch.save(state_dict, path) and pass that."
        ) from None
    except Exception as err:  # noqa: BLE001 - any other read failure means "not a checkpoint we read"
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path} could not be read as a PyTorch checkpoint ({first_line}).") from None


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as err:  # noqa: BLE001
        raise CheckpointError(f"{path} is not a valid safetensors file ({err}).") from err
    return tensors, metadata


def _sharded_index(path: Path) -> Optional[Path]:
    """The index of a sharded export that `path` names: the index itself, or `export.safetensors` when only
    its shards and index exist."""
    if path.name.endswith(".safetensors" + INDEX_SUFFIX) and path.is_file():
        return path
    if path.suffix == ".safetensors" and not path.exists() and index_path(path).is_file():
        return index_path(path)
    return None


def _read_sharded_safetensors(index_file: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a Hugging Face-style sharded export (shards + `*.safetensors.index.json`)."""
    try:
        index = json.loads(index_file.read_text())
        weight_map, metadata = index["weight_map"], index.get("metadata", {})
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{index_file} is not a safetensors index ({err}).") from None
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(set(weight_map.values())):
        shard = index_file.parent / file
        if not shard.is_file():
            raise CheckpointError(f"{index_file} names the shard {file}, which is missing beside it.")
        tensors.update(_read_safetensors(shard)[0])
    missing = sorted(set(weight_map) - set(tensors))
    if missing:
        raise CheckpointError(f"{index_file} lists {len(missing)} tensor(s) its shards do not hold, e.g. {missing[0]}.")
    return tensors, {k: v for k, v in metadata.items() if isinstance(v, str)}


def _split_prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {key[len(prefix) :]: value for key, value in tensors.items() if key.startswith(prefix)}


def _latest_tag_dir(directory: Path) -> Path:
    """The complete tag a results, checkpoints or tag dir names (the layout's one resolver)."""
    tag_dir = layout.resolve_tag_dir(directory)
    if tag_dir is None:
        raise CheckpointError(
            f"{directory} is a directory but not a DeepSpeed checkpoint: neither it nor a checkpoints/ dir in it "
            f"holds a complete tag (a {layout.TAG_PREFIX}NNNNNNN dir with a {layout.COMPLETE_MARKER} file)."
        )
    return tag_dir


def _read_deepspeed_dir(
    directory: Path, prefer_ema: bool
) -> tuple[Optional[dict], Optional[dict], dict[str, torch.Tensor], dict[str, Any]]:
    """(stored model config dict, stored objective config dict, state dict, run record) of the tag
    `directory` resolves to."""
    tag_dir = _latest_tag_dir(directory)
    configs = layout.read_model_config(tag_dir), layout.read_objective_config(tag_dir)
    return (*configs, _read_deepspeed_weights(tag_dir, prefer_ema), layout.read_run_record(tag_dir))


def _read_deepspeed_weights(tag_dir: Path, prefer_ema: bool) -> dict[str, torch.Tensor]:
    ema_file = tag_dir / layout.EMA_FILE
    states = sorted(tag_dir.glob("mp_rank_*_model_states.pt"))
    if ema_file.is_file() and (prefer_ema or not states):
        return _read_safetensors(ema_file)[0]
    if not states:
        raise CheckpointError(f"{tag_dir} holds no model weights (no {layout.EMA_FILE} or mp_rank_*_model_states.pt).")
    blob = safe_torch_load(states[0])  # safe loading: a stranger's tag can hold any pickle
    module = blob.get("module") if isinstance(blob, dict) else None
    if not module:
        raise CheckpointError(
            f"{states[0]} holds ZeRO-3 partitioned weights only; export the run with the trainer "
            "(`--export-only`) or convert it with DeepSpeed's zero_to_fp32.py first."
        )
    return {**_clean_keys(module), **_gather_expert_shards(tag_dir)}


def _gather_expert_shards(tag_dir: Path) -> dict[str, torch.Tensor]:
    """Full [E, ...] expert weights from an expert-parallel checkpoint's per-rank shards (none: {})."""
    shards = []
    while layout.expert_shard(tag_dir, len(shards)).is_file():
        shards.append(_read_safetensors(layout.expert_shard(tag_dir, len(shards)))[0])
    return {key: torch.cat([shard[key] for shard in shards]) for key in shards[0]} if shards else {}


def read_checkpoint_file(path: str | os.PathLike, prefer_ema: bool = True) -> CheckpointContents:
    """Read any supported checkpoint once: weights (EMA preferred) and the configs it records."""
    path = Path(path)
    sharded = _sharded_index(path)
    if sharded is None and not path.exists():
        raise CheckpointError(
            f"Checkpoint {path} does not exist; pass the path of a .pt/.safetensors file or checkpoint directory."
        )
    run: dict[str, Any] = {}
    if path.is_dir():
        model, objective, state_dict, run = _read_deepspeed_dir(path, prefer_ema)
    elif sharded is not None or path.suffix == ".safetensors":
        state_dict, metadata = _read_sharded_safetensors(sharded) if sharded else _read_safetensors(path)
        model, objective, run = (
            json.loads(metadata[k]) if k in metadata else None for k in ("config", "objective", "run")
        )
        if metadata.get("format") == EXPORT_FORMAT:
            ema = _split_prefixed(state_dict, "ema.")
            state_dict = ema if (prefer_ema and ema) else _split_prefixed(state_dict, "model.")
    else:
        model, objective, state_dict, run = _read_torch_file(path, prefer_ema)
    state_dict = _clean_keys(state_dict)
    return CheckpointContents(state_dict, *parse_configs(model, objective, state_dict), run=run or {})


def _read_torch_file(
    path: Path, prefer_ema: bool
) -> tuple[Optional[dict], Optional[dict], dict[str, torch.Tensor], dict]:
    """(model config dict, objective config dict, state dict, run record) of a `.pt`: a state dict or a
    checkpoint dict."""
    blob = safe_torch_load(path)
    if not isinstance(blob, dict):
        raise CheckpointError(f"{path} holds a {type(blob).__name__}, not a state dict or checkpoint dict.")
    model, objective = (blob.get(key) if isinstance(blob.get(key), dict) else None for key in ("config", "objective"))
    state_dict = blob
    if "ema" in blob or "model" in blob or "module" in blob:
        choice = ("ema", "model", "module") if prefer_ema else ("model", "module", "ema")
        state_dict = next(blob[key] for key in choice if isinstance(blob.get(key), dict))
    return model, objective, state_dict, blob.get("run") if isinstance(blob.get("run"), dict) else {}
