"""Read every supported checkpoint format, infer the architecture, build the model; write exports.

Formats read by `load_model` / `read_checkpoint_file`:
- facebookresearch/DiT: a plain state dict (released weights) or train.py's {"model", "ema", "opt", "args"};
- feizc/DiT-MoE: the same containers with per-expert keys `blocks.N.moe.experts.K.*` (stacked at load);
- our exports (`.safetensors` or `.pt`): weights + EMA + the DiTConfig that built them and the
  ObjectiveConfig it was trained with (files written before the objective config record only
  the objective and its flow time scale, inside a flat model config: remapped here);
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import checkpoint_layout as layout
from .atomic import atomic_path
from .diffusion import ObjectiveConfig
from .models import MODEL_SIZES, DiT, DiTConfig
from .models.attention import flash_layout_keys
from .models.experts import unstack_expert_state_dict

EXPORT_FORMAT = "dit-moe-export"
_STRIP_PREFIXES = ("module.", "_orig_mod.")
_HEADS_BY_WIDTH = {hidden: heads for _, hidden, heads in MODEL_SIZES.values()}

torch.serialization.add_safe_globals([argparse.Namespace])


class CheckpointError(ValueError):
    """A file that is not a checkpoint this package can read."""


@dataclass
class CheckpointContents:
    """What one read of a checkpoint gives: weights and whatever configs the file records."""

    state_dict: dict[str, torch.Tensor]
    model_config: Optional[DiTConfig]  # None: the file records none (infer_config rebuilds it)
    objective: Optional[ObjectiveConfig]  # None: the file records none (official DiT, feizc/DiT-MoE)
    # "stored": the whole ObjectiveConfig; "legacy": a file written before it, which recorded the
    # objective and flow time scale only (its noise schedule and diffusion steps were never saved).
    objective_source: Optional[str]


def _parse_configs(
    model: Optional[dict], objective: Optional[dict]
) -> tuple[Optional[DiTConfig], Optional[ObjectiveConfig], Optional[str]]:
    """(model config, objective config, objective source) from the stored dicts, old flat layout included."""
    if objective is not None:
        return DiTConfig.from_dict(model) if model is not None else None, ObjectiveConfig.from_dict(objective), "stored"
    if model is None:
        return None, None, None
    if "moe" not in model:  # the flat layout recorded the objective inside the model config
        legacy = ObjectiveConfig(objective=model.get("objective", "iddpm"), flow_t_scale=model.get("flow_t_scale", 1.0))
        return DiTConfig.from_dict(model), legacy, "legacy"
    return DiTConfig.from_dict(model), None, None


def _clean_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    cleaned = {}
    for key, value in state_dict.items():
        for prefix in _STRIP_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
        cleaned[key] = value
    return cleaned


def _torch_load(path: Path) -> Any:
    """torch.load with weights_only=True: tensors and plain containers, never arbitrary objects."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
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
) -> tuple[Optional[dict], Optional[dict], dict[str, torch.Tensor]]:
    """(stored model config dict, stored objective config dict, state dict) of the tag `directory` resolves to."""
    tag_dir = _latest_tag_dir(directory)
    configs = layout.read_model_config(tag_dir), layout.read_objective_config(tag_dir)
    return (*configs, _read_deepspeed_weights(tag_dir, prefer_ema))


def _read_deepspeed_weights(tag_dir: Path, prefer_ema: bool) -> dict[str, torch.Tensor]:
    ema_file = tag_dir / layout.EMA_FILE
    states = sorted(tag_dir.glob("mp_rank_*_model_states.pt"))
    if ema_file.is_file() and (prefer_ema or not states):
        return _read_safetensors(ema_file)[0]
    if not states:
        raise CheckpointError(f"{tag_dir} holds no model weights (no {layout.EMA_FILE} or mp_rank_*_model_states.pt).")
    blob = torch.load(states[0], map_location="cpu", weights_only=False)
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
    if not path.exists():
        raise CheckpointError(
            f"Checkpoint {path} does not exist; pass the path of a .pt/.safetensors file or checkpoint directory."
        )
    if path.is_dir():
        model, objective, state_dict = _read_deepspeed_dir(path, prefer_ema)
    elif path.suffix == ".safetensors":
        state_dict, metadata = _read_safetensors(path)
        model, objective = (json.loads(metadata[key]) if key in metadata else None for key in ("config", "objective"))
        if metadata.get("format") == EXPORT_FORMAT:
            ema = _split_prefixed(state_dict, "ema.")
            state_dict = ema if (prefer_ema and ema) else _split_prefixed(state_dict, "model.")
    else:
        model, objective, state_dict = _read_torch_file(path, prefer_ema)
    return CheckpointContents(_clean_keys(state_dict), *_parse_configs(model, objective))


def _read_torch_file(path: Path, prefer_ema: bool) -> tuple[Optional[dict], Optional[dict], dict[str, torch.Tensor]]:
    """(model config dict, objective config dict, state dict) of a `.pt`: a state dict or a checkpoint dict."""
    blob = _torch_load(path)
    if not isinstance(blob, dict):
        raise CheckpointError(f"{path} holds a {type(blob).__name__}, not a state dict or checkpoint dict.")
    model, objective = (blob.get(key) if isinstance(blob.get(key), dict) else None for key in ("config", "objective"))
    state_dict = blob
    if "ema" in blob or "model" in blob or "module" in blob:
        choice = ("ema", "model", "module") if prefer_ema else ("model", "module", "ema")
        state_dict = next(blob[key] for key in choice if isinstance(blob.get(key), dict))
    return model, objective, state_dict


# Key fragments that tell, in a file that records no objective, which reference code wrote it.
FLASH_LAYOUT_KEY = "blocks.0.attn.Wqkv.weight"  # DiT-MoE train_deepspeed.py's FlashSelfMHAModified
_PER_EXPERT_KEY = re.compile(r"blocks\.\d+\.moe\.experts\.\d+\.")  # DiT-MoE's SparseMoeBlock, one module per expert


def objective_evidence(state_dict: dict[str, torch.Tensor]) -> tuple[Optional[ObjectiveConfig], str]:
    """How a file that records no objective was trained, judged from which reference wrote it:
    (the objective, or None where the keys are not conclusive; the evidence, for messages).

    DiT-MoE's released rectified-flow checkpoints (XL/2, G/2) come from its train_deepspeed.py, the
    only writer of the flash-attention layout (`attn.Wqkv`, `q_norm`, `k_norm`, `out_proj`); it
    feeds the raw flow time t in (0, 1) to the model (time scale 1). Its DDPM ones (S/2, B/2) come
    from its train.py (`attn.qkv` with per-expert `moe.experts.K` modules), and official DiT files
    (`attn.qkv`, dense `mlp`) are IDDPM models.
    """
    has_qkv = "blocks.0.attn.qkv.weight" in state_dict
    if FLASH_LAYOUT_KEY in state_dict:
        return (
            ObjectiveConfig(objective="flow", flow_t_scale=1.0),
            "DiT-MoE's flash-attention keys (attn.Wqkv, q_norm, k_norm, out_proj), the layout of its "
            "rectified-flow checkpoints",
        )
    if has_qkv and "blocks.0.attn.q_norm.weight" not in state_dict:
        if any(_PER_EXPERT_KEY.match(key) for key in state_dict):
            return ObjectiveConfig(), "DiT-MoE's train.py keys (attn.qkv, per-expert moe.experts.K), its DDPM layout"
        if not any(".moe." in key for key in state_dict):
            return ObjectiveConfig(), "facebookresearch/DiT's keys (attn.qkv, dense mlp), an IDDPM model"
    return None, "keys that no reference's released checkpoints use (no recorded objective config)"


def infer_config(state_dict: dict[str, torch.Tensor], **overrides: Any) -> DiTConfig:
    """Rebuild a DiTConfig from tensor shapes (official DiT, feizc/DiT-MoE or our stacked layout)."""
    if "x_embedder.proj.weight" not in state_dict or "final_layer.linear.weight" not in state_dict:
        raise CheckpointError(
            "This state dict is not a DiT checkpoint: it lacks x_embedder.proj.weight / final_layer.linear.weight."
        )
    hidden, in_channels, patch, _ = state_dict["x_embedder.proj.weight"].shape
    depth = 1 + max(int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k)))
    num_patches = state_dict["pos_embed"].shape[1]
    grid = round(num_patches**0.5)
    out_channels = state_dict["final_layer.linear.weight"].shape[0] // (patch * patch)
    values: dict[str, Any] = dict(
        input_size=grid * patch,
        patch_size=patch,
        in_channels=in_channels,
        hidden_size=hidden,
        depth=depth,
        learn_sigma=out_channels == 2 * in_channels,
        num_classes=state_dict["y_embedder.embedding_table.weight"].shape[0] - 1,
    )
    q_norm = state_dict.get("blocks.0.attn.q_norm.weight")
    values["qk_norm"] = q_norm is not None
    if q_norm is not None:
        values["num_heads"] = hidden // q_norm.shape[0]
    elif overrides.get("num_heads") is None:
        if hidden not in _HEADS_BY_WIDTH:
            raise CheckpointError(
                f"Cannot infer the head count of a width-{hidden} model; pass num_heads=... to load_model."
            )
        values["num_heads"] = _HEADS_BY_WIDTH[hidden]
    values.update(_infer_ffn(state_dict, hidden, depth))
    values.update(_infer_decoder(state_dict, overrides.get("decoder_num_heads")))
    values.update({k: v for k, v in overrides.items() if v is not None})
    return DiTConfig.from_flat(**values)


def _infer_decoder(state_dict: dict[str, torch.Tensor], num_heads: Optional[int]) -> dict[str, Any]:
    """MaskDiT decoder depth and width from `decoder_blocks.*` and `mask_token`; heads from q_norm if present."""
    indices = {int(m.group(1)) for k in state_dict if (m := re.match(r"decoder_blocks\.(\d+)\.", k))}
    if not indices:
        return dict(decoder_depth=0)
    width = state_dict["mask_token"].shape[-1]
    q_norm = state_dict.get("decoder_blocks.0.attn.q_norm.weight")
    if q_norm is not None:
        num_heads = width // q_norm.shape[0]
    elif num_heads is None:
        num_heads = DiTConfig.decoder_num_heads
        if width % num_heads:
            raise CheckpointError(
                f"Cannot infer the head count of a width-{width} decoder; pass decoder_num_heads=... to load_model."
            )
    return dict(decoder_depth=1 + max(indices), decoder_hidden_size=width, decoder_num_heads=num_heads)


def _infer_ffn(state_dict: dict[str, torch.Tensor], hidden: int, depth: int) -> dict[str, Any]:
    moe_layers = sorted({int(m.group(1)) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.moe\.", k))})
    if not moe_layers:
        return dict(num_experts=0, mlp_ratio=state_dict["blocks.0.mlp.fc1.weight"].shape[0] / hidden)
    block = f"blocks.{moe_layers[0]}.moe."
    num_experts = state_dict[block + "gate.weight"].shape[0]
    keys = [k for k in state_dict if k.startswith(block + "experts.")]
    swiglu = any("gate_proj" in k for k in keys)
    # stacked "experts.gate_proj" [E, I, C] or feizc's per-expert "experts.K.gate_proj.weight" [I, C]
    first = next(k for k in keys if ("gate_proj" in k if swiglu else "fc1" in k) and "bias" not in k)
    intermediate = state_dict[first].shape[-2]
    shared = state_dict.get(block + "shared_experts.gate_proj.weight")
    values: dict[str, Any] = dict(
        num_experts=num_experts,
        expert_type="swiglu" if swiglu else "gelu",
        mlp_ratio=intermediate / hidden,
        n_shared_experts=0 if shared is None else shared.shape[0] // hidden,
        moe_layers=None if len(moe_layers) == depth else moe_layers,
    )
    dense = [i for i in range(depth) if i not in moe_layers]
    if dense:
        dense_ratio = state_dict[f"blocks.{dense[0]}.mlp.fc1.weight"].shape[0] / hidden
        if dense_ratio != values["mlp_ratio"]:
            raise CheckpointError(
                f"Dense blocks have mlp_ratio {dense_ratio} but experts {values['mlp_ratio']}; mixed widths are not supported."
            )
    return values


@dataclass
class LoadedModel:
    """A model built from a checkpoint, with what the file says about how it was trained."""

    model: DiT
    # The recorded objective, or for a file that records none what its keys show (objective_evidence);
    # None: not conclusive.
    objective: Optional[ObjectiveConfig]
    # "stored" | "legacy" (as in CheckpointContents) | "evidence" (judged from the keys) | None
    objective_source: Optional[str]
    config_source: str  # "stored": the file holds the model config; "inferred": rebuilt from tensor shapes
    evidence: str = ""  # for "evidence" and None: what the keys showed, for messages


def load_model(
    path: str | os.PathLike,
    num_experts_per_tok: Optional[int] = None,
    prefer_ema: bool = True,
    device: str | torch.device = "cpu",
    **overrides: Any,
) -> DiT:
    """Build the right DiT for a checkpoint and load its weights (EMA preferred); returns it in eval mode.

    feizc/DiT-MoE files do not record top-k: it defaults to 2 (every published DiT-MoE model);
    `num_experts_per_tok` and any other DiTConfig field can be overridden.
    """
    return load_checkpoint_model(path, num_experts_per_tok, prefer_ema, device, **overrides).model


def load_checkpoint_model(
    path: str | os.PathLike,
    num_experts_per_tok: Optional[int] = None,
    prefer_ema: bool = True,
    device: str | torch.device = "cpu",
    **overrides: Any,
) -> LoadedModel:
    """`load_model`, reading the file once, plus the recorded objective and where the config came from."""
    contents = read_checkpoint_file(path, prefer_ema=prefer_ema)
    stored, state_dict = contents.model_config, contents.state_dict
    if num_experts_per_tok is not None:
        overrides["num_experts_per_tok"] = num_experts_per_tok
    config = stored.replace(**overrides) if stored is not None else infer_config(state_dict, **overrides)
    model = DiT(config)
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not match the inferred {config.depth}-block, width-{config.hidden_size} model: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
            f"{'...' if len(unexpected) > 5 else ''}."
        )
    objective, source, evidence = contents.objective, contents.objective_source, ""
    if objective is None:
        objective, evidence = objective_evidence(state_dict)
        source = "evidence" if objective is not None else None
    return LoadedModel(
        model.to(device).eval(), objective, source, "stored" if stored is not None else "inferred", evidence
    )


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
