"""Write any checkpoint `load_model` reads as a folder that `DiffusionPipeline.from_pretrained` loads.

    python -m dit_moe.diffusers export --ckpt results/run/export.safetensors --out my-dit-moe/

The folder (diffusers' layout, loaded with `trust_remote_code=True`):

    model_index.json              ["pipeline_dit_moe", "DiTMoEPipeline"], the components, id2label,
                                  objective, flow_t_scale, guidance defaults
    pipeline_dit_moe.py           the pipeline's code (bundle.py: generated from this package)
    transformer/config.json       {"dit_config": the DiTConfig}
    transformer/modeling_dit_moe.py
    transformer/diffusion_pytorch_model.safetensors   (or -0000K-of-0000N shards + index)
    scheduler/scheduler_config.json
    vae/                          latent models only: the AutoencoderKL the model was trained with

The objective is resolved as sample.py resolves it (the file's record, else `--objective`), and
so is the VAE (`--vae-path`, names such as `mse` fetched by dit_moe.hub). The folder appears whole
or not at all: it is written beside `--out` under a temporary name and renamed.

Cost: the export reads the checkpoint once into host memory (DiT-MoE-G/2 16E2A: 66 GB in fp32) on
one process and writes it in `max_shard_size` shards; nothing is gathered across ranks.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..checkpoint import load_checkpoint_model
from ..hub import resolve_checkpoint, resolve_vae
from ..sampling.prepare import SamplingRequest, resolve_codec, resolve_objective
from ..utils.errors import UserError
from .bundle import PIPELINE_MODULE, TRANSFORMER_MODULE, pipeline_code, transformer_code
from .labels import class_names
from .pipeline import DiTMoEPipeline
from .schedulers import scheduler_for
from .transformer import DiTMoETransformer2DModel

DEFAULT_MAX_SHARD_SIZE = "10GB"  # diffusers' own default for save_pretrained


@dataclass
class ExportRequest:
    """What `python -m dit_moe.diffusers export` asks for; None leaves the choice to the checkpoint."""

    ckpt: str | os.PathLike  # anything load_model reads, or a release name (dit_moe.hub)
    out: str | os.PathLike  # the pipeline folder to write (replaced if it exists)
    vae_path: Optional[str] = None  # latent models: AutoencoderKL folder or name (mse, ema, hub id)
    objective: Optional[str] = None  # "iddpm" | "flow" for files that record none
    class_names: Optional[str] = None  # JSON file, "none", or None: digits' / ImageNet's by class count
    guidance_channels: Optional[int] = None  # default guided channels: None all, 3 DiT's forward_with_cfg
    num_experts_per_tok: Optional[int] = None  # top-k override (feizc/DiT-MoE files do not record it)
    max_shard_size: str = DEFAULT_MAX_SHARD_SIZE


def build_pipeline(request: ExportRequest) -> DiTMoEPipeline:
    """The pipeline for `request.ckpt`, in memory: the loaded DiT wrapped (not copied), its scheduler,
    VAE and class names; bad input raises one sentence."""
    # SDPA attention and no recomputation: a folder that loads wherever torch runs, flash-attn or not.
    portable = dict(attn_backend="sdpa", grad_checkpointing=False)
    loaded = load_checkpoint_model(resolve_checkpoint(request.ckpt), request.num_experts_per_tok, **portable)
    config = loaded.model.config
    sampling = SamplingRequest(request.ckpt, vae_path=resolve_vae(request.vae_path), objective=request.objective)
    resolved = resolve_objective(loaded, sampling)
    codec = resolve_codec(sampling.vae_path, config)
    vae = getattr(codec, "vae", None)
    if vae is not None:
        vae.register_to_config(scaling_factor=codec.scale_factor)  # dit-moe's latent scale, read by the pipeline
    return DiTMoEPipeline(
        transformer=DiTMoETransformer2DModel.from_dit(loaded.model),
        scheduler=scheduler_for(resolved.config, config.learn_sigma),
        vae=vae,
        id2label=class_names(request.class_names, config.num_classes),
        objective=resolved.name,
        flow_t_scale=resolved.config.flow_t_scale,
        guidance_channels=request.guidance_channels,
        default_guidance_scale=resolved.default_cfg_scale,
    )


def write_folder(pipe: DiTMoEPipeline, folder: Path, max_shard_size: str = DEFAULT_MAX_SHARD_SIZE) -> None:
    """save_pretrained, then the shipped code and model_index.json naming it."""
    pipe.save_pretrained(folder, safe_serialization=True, max_shard_size=max_shard_size)
    (folder / f"{PIPELINE_MODULE}.py").write_text(pipeline_code())
    (folder / "transformer" / f"{TRANSFORMER_MODULE}.py").write_text(transformer_code())
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text())
    index["_class_name"] = [PIPELINE_MODULE, type(pipe).__name__]
    index["transformer"] = [TRANSFORMER_MODULE, type(pipe.transformer).__name__]
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def export_pipeline(request: ExportRequest) -> Path:
    """Write the pipeline folder for `request` atomically (module docstring); returns its path."""
    if request.guidance_channels is not None and request.guidance_channels < 1:
        raise UserError(f"--guidance-channels must be at least 1, got {request.guidance_channels}.")
    out = Path(request.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; pass a folder for the pipeline.")
    if out.exists() and not (out / "model_index.json").is_file() and any(out.iterdir()):
        raise UserError(f"--out {out} is a non-empty folder that holds no pipeline; pass a new or empty folder.")
    pipe = build_pipeline(request)
    tmp, old = out.with_name(f".{out.name}.{os.getpid()}.tmp"), out.with_name(f".{out.name}.{os.getpid()}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write_folder(pipe, tmp, request.max_shard_size)
        if out.exists():
            out.rename(old)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return out
