"""What a file that records no config says about itself: the architecture from tensor shapes, the
objective from which reference code wrote it."""

from __future__ import annotations

import re
from typing import Any, Optional

import torch

from ..diffusion import ObjectiveConfig
from ..models import MODEL_SIZES, DiTConfig
from ..utils.errors import CheckpointError

_HEADS_BY_WIDTH = {hidden: heads for _, hidden, heads in MODEL_SIZES.values()}

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
