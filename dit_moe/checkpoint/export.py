"""Exports: one self-describing file of weights, EMA, model config and objective config."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import save_file

from ..diffusion import ObjectiveConfig
from ..models import DiTConfig
from ..models.attention import flash_layout_keys
from ..models.experts import unstack_expert_state_dict
from ..utils.atomic import atomic_path, require_free_space

EXPORT_FORMAT = "dit-moe-export"


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
) -> Path:
    """Write a self-describing export atomically: `.safetensors` or `.pt` (by suffix) holding the
    weights, the EMA, the model config and the objective config (when known: an upcycled
    official DiT file records none)."""
    path = Path(path)
    require_free_space(path, _stored_bytes(model_state) + _stored_bytes(ema_state or {}))
    configs = {"config": config.to_dict()}
    if objective is not None:
        configs["objective"] = objective.to_dict()
    with atomic_path(path) as tmp:
        if path.suffix == ".safetensors":
            tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model_state.items()}
            if ema_state is not None:
                tensors.update({f"ema.{k}": v.detach().cpu().contiguous() for k, v in ema_state.items()})
            metadata = {"format": EXPORT_FORMAT, **{key: json.dumps(value) for key, value in configs.items()}}
            save_file(tensors, str(tmp), metadata=metadata)
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
