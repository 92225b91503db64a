"""Exports: self-describing weights, EMA, model config and objective config.

One file (`export.safetensors` or `.pt`) up to `SHARD_BYTES`; a larger safetensors export is written as
Hugging Face-style shards, `export-00001-of-0000N.safetensors` ... plus `export.safetensors.index.json`
(the names and index `huggingface_hub.split_torch_state_dict_into_shards` gives; the index's "metadata"
and every shard's header carry the format and configs). `dit_moe.checkpoint.read` reads both, by the
file's name or the index's.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors import safe_open
from safetensors.torch import save_file

from ..diffusion import ObjectiveConfig
from ..models import DiTConfig
from ..models.attention import flash_layout_keys
from ..models.experts import unstack_expert_state_dict
from ..utils.atomic import atomic_path, require_free_space

EXPORT_FORMAT = "dit-moe-export"
SHARD_BYTES = 5 * 10**9  # one export file at most (huggingface_hub's default shard size); larger: shards
INDEX_SUFFIX = ".index.json"


def index_path(path: Path) -> Path:
    """The index of a sharded export named `path` (`export.safetensors` -> `export.safetensors.index.json`)."""
    return path.with_name(path.name + INDEX_SUFFIX)


def export_metadata(
    config: DiTConfig, objective: Optional[ObjectiveConfig], run: Optional[dict[str, Any]] = None
) -> dict[str, str]:
    """The header metadata that makes an export self-describing: the model and objective configs and, for a
    trainer's export, `run`: the step and tag it was written from and the VAE with its latent scale factor."""
    configs: dict[str, Any] = {"config": config.to_dict()}
    if objective is not None:
        configs["objective"] = objective.to_dict()
    if run:
        configs["run"] = run
    return {"format": EXPORT_FORMAT, **{key: json.dumps(value) for key, value in configs.items()}}


def plan_shards(path: Path, shapes: dict[str, tuple[int, ...]], max_bytes: int) -> Optional[dict[str, list[str]]]:
    """Shard file name -> tensor names (fp32, in the given order) for an export of these tensors, or None when
    one file holds them."""
    meta = {name: torch.empty(shape, dtype=torch.float32, device="meta") for name, shape in shapes.items()}
    split = split_torch_state_dict_into_shards(
        meta, filename_pattern=path.stem + "{suffix}.safetensors", max_shard_size=max_bytes
    )
    return split.filename_to_tensors if split.is_sharded else None


def write_shard(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def write_index(path: Path, shards: dict[str, list[str]], total_bytes: int, metadata: dict[str, str]) -> Path:
    """The index of a sharded export, written last: a reader that finds it finds every shard."""
    weight_map = {name: file for file, names in shards.items() for name in names}
    index = {"metadata": {"total_size": total_bytes, **metadata}, "weight_map": weight_map}
    with atomic_path(index_path(path)) as tmp:
        tmp.write_text(json.dumps(index, indent=2))
    return index_path(path)


def recorded_step(path: Path) -> Optional[int]:
    """The training step an existing export (one file or sharded) records, read from its header alone;
    None when there is none or it records no step."""
    metadata: dict[str, Any] = {}
    if index_path(path).is_file():
        metadata = json.loads(index_path(path).read_text()).get("metadata", {})
    elif path.is_file() and path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    elif path.is_file():
        blob = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        metadata = {"run": json.dumps(blob.get("run", {}))} if isinstance(blob, dict) else {}
    run = json.loads(metadata.get("run", "{}"))
    return run.get("step") if isinstance(run, dict) else None


def dit_moe_layout(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict of ours in feizc/DiT-MoE's key layout, for its own scripts: per-expert
    `moe.experts.K.*` modules, and for QK-norm blocks the flash-attention names (`attn.Wqkv`,
    `attn.out_proj`) of its train_deepspeed.py. `load_model` reads it back (remapped at load)."""
    return flash_layout_keys(unstack_expert_state_dict(state_dict))


def save_export(
    path: str | os.PathLike,
    config: DiTConfig,
    model_state: dict[str, torch.Tensor],
    ema_state: Optional[dict[str, torch.Tensor]] = None,
    objective: Optional[ObjectiveConfig] = None,
    run: Optional[dict[str, Any]] = None,
) -> Path:
    """Write a self-describing export atomically: `.safetensors` or `.pt` (by suffix) holding the
    weights, the EMA, the model config and the objective config (when known: an upcycled
    official DiT file records none)."""
    path = Path(path)
    require_free_space(path, _stored_bytes(model_state) + _stored_bytes(ema_state or {}))
    configs: dict[str, Any] = {"config": config.to_dict()}
    if objective is not None:
        configs["objective"] = objective.to_dict()
    if run:
        configs["run"] = run
    with atomic_path(path) as tmp:
        if path.suffix == ".safetensors":
            tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model_state.items()}
            if ema_state is not None:
                tensors.update({f"ema.{k}": v.detach().cpu().contiguous() for k, v in ema_state.items()})
            save_file(tensors, str(tmp), metadata=export_metadata(config, objective, run))
        else:
            blob = {"format": EXPORT_FORMAT, **configs, "model": _cpu(model_state)}
            if ema_state is not None:
                blob["ema"] = _cpu(ema_state)
            torch.save(blob, tmp)
    return path


def _cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in state.items()}


def _stored_bytes(state: dict[str, torch.Tensor]) -> int:
    """Bytes the tensors of `state` take in an export (headers are small beside them)."""
    return sum(v.numel() * v.element_size() for v in state.values())
