"""Upcycling as a tool: read any supported dense checkpoint, upcycle it, write an export.

upcycle_checkpoint(UpcycleRequest("dense.pt", "moe.safetensors", moe=upcycle_moe_args(8, 2)))
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from ..checkpoint import infer_config, read_checkpoint_file, save_export
from ..models import MODEL_SIZES, DiT_models, DiTConfig, MoEArgs, preset_name
from .transform import (
    ExpertInit,
    UpcycleError,
    dense_ffn_layout,
    moe_layers_every,
    require_dense,
    upcycle_moe_args,
    upcycle_state_dict,
)

_WIDTHS = {hidden for _, hidden, _ in MODEL_SIZES.values()}


@dataclass(frozen=True)
class UpcycleRequest:
    """One upcycling: which file, into which MoE shape, and what the source is expected to be.

    `model`, `image_size` (pixels; input size = image_size // 8 for a 4-channel latent model,
    image_size otherwise), `input_size` and `num_classes` are checked against the file when given;
    `num_heads` is needed only for non-preset widths the file does not describe.
    """

    ckpt: str | os.PathLike  # dense checkpoint: official DiT .pt, train.py dict, export or DeepSpeed dir
    out: str | os.PathLike  # the export to write, .safetensors or .pt by suffix
    moe: MoEArgs = field(default_factory=upcycle_moe_args)  # the MoE shape (moe_layers: None = every block)
    init: ExpertInit = ExpertInit()
    moe_every: Optional[int] = None  # upcycle every N-th block instead of moe.moe_layers
    model: Optional[str] = None
    image_size: Optional[int] = None
    input_size: Optional[int] = None
    num_classes: Optional[int] = None
    num_heads: Optional[int] = None
    weights: str = "ema"  # "ema" | "raw": which of the file's weight sets to upcycle


def _infer_dense_config(state: dict[str, torch.Tensor], num_heads: Optional[int]) -> DiTConfig:
    """infer_config for a dense file, SwiGLU dense MLPs included.

    infer_config reads the MLP width from `mlp.fc1.weight` only; a SwiGLU `mlp.gate_proj.weight`
    has the same [I, C] shape, so it stands in for it in a shallow key view.
    """
    embed = state.get("x_embedder.proj.weight")
    if embed is not None and not any(".moe." in key for key in state):
        dense_ffn_layout(state, 0)  # an unknown MLP layout fails here, with a sentence
        if num_heads is None and embed.shape[0] not in _WIDTHS and "blocks.0.attn.q_norm.weight" not in state:
            raise UpcycleError(
                f"Cannot infer the head count of a width-{embed.shape[0]} model from its weights; pass --num-heads."
            )
    view = dict(state)
    for key, value in state.items():
        if key.endswith(".mlp.gate_proj.weight"):
            view.setdefault(key.replace(".mlp.gate_proj.", ".mlp.fc1."), value)
    return infer_config(view, num_heads=num_heads)  # None: inferred from the width or q_norm


def _check_request(config: DiTConfig, request: UpcycleRequest) -> None:
    """Flags that describe the source must agree with what the file holds."""
    src, model, image_size = Path(request.ckpt), request.model, request.image_size
    input_size, num_classes = request.input_size, request.num_classes
    name = preset_name(config)
    if model is not None:
        if model not in DiT_models:
            raise UpcycleError(f"Unknown --model {model!r}; choose one of {sorted(DiT_models)}.")
        if model != name:
            shape = f"depth {config.depth}, width {config.hidden_size}, patch {config.patch_size}"
            held = name or f"a custom model ({shape})"
            fix = f"pass --model {name} or drop --model" if name else "drop --model"
            raise UpcycleError(f"--model {model} does not match {src}, which holds {held}; {fix}.")
    if image_size is not None:
        # 4 channels: an SD-VAE latent (8x downsampling, DiT's convention); otherwise pixel space.
        latent = image_size // 8 if config.in_channels == 4 else image_size
        if latent != config.input_size:
            expected = config.input_size * 8 if config.in_channels == 4 else config.input_size
            raise UpcycleError(
                f"--image-size {image_size} does not match {src}, which was trained at input size "
                f"{config.input_size} (image size {expected}); pass --image-size {expected} or drop it."
            )
    if input_size is not None and input_size != config.input_size:
        raise UpcycleError(
            f"--input-size {input_size} does not match {src}, whose input size is {config.input_size}; "
            f"pass --input-size {config.input_size} or drop it."
        )
    if num_classes is not None and num_classes != config.num_classes:
        raise UpcycleError(
            f"--num-classes {num_classes} does not match {src}, which has {config.num_classes} classes; "
            f"pass --num-classes {config.num_classes} or drop it."
        )


def upcycle_checkpoint(request: UpcycleRequest) -> tuple[DiTConfig, DiTConfig, Path]:
    """Upcycle the dense checkpoint `request.ckpt` (EMA weights when it has them) into an export at
    `request.out`; returns (dense_config, moe_config, written path).

    Reads every format `read_checkpoint_file` reads (official DiT state dict, train.py dict, our
    exports, DeepSpeed dirs); the architecture comes from the file's stored config or its tensor
    shapes. The export holds the weights, the MoE config and the source's objective config when it
    records one; the source file is only read.
    """
    src, out = Path(request.ckpt), Path(request.out)
    if out.exists() and src.exists() and out.resolve() == src.resolve():
        raise UpcycleError(f"--out {out} is the source checkpoint; write the upcycled model to another path.")
    moe = request.moe
    if moe.moe_layers is not None and request.moe_every is not None:
        raise UpcycleError("Pass either --moe-layers or --moe-every, not both.")
    contents = read_checkpoint_file(src, prefer_ema=request.weights == "ema")
    stored, state = contents.model_config, contents.state_dict
    dense_config = stored if stored is not None else _infer_dense_config(state, request.num_heads)
    require_dense(dense_config, state)
    _check_request(dense_config, request)
    if request.moe_every is not None:
        moe = MoEArgs(**{**vars(moe), "moe_layers": moe_layers_every(dense_config.depth, request.moe_every)})
    moe_config, moe_state = upcycle_state_dict(state, dense_config, moe, request.init)
    return dense_config, moe_config, save_export(out, moe_config, moe_state, objective=contents.trained_as.recorded)
