"""Load an exported pipeline folder with this package's classes: no remote code is run.

    from dit_moe.diffusers import load_pipeline
    pipe = load_pipeline("exported/")        # same as DiffusionPipeline.from_pretrained(..., trust_remote_code=True)

diffusers' own `from_pretrained` imports the copies of the code the folder ships as soon as
model_index.json names them, so it needs `trust_remote_code=True` even when called on
DiTMoEPipeline; this builds the same pipeline from the installed classes instead.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import diffusers
import torch

from .pipeline import DiTMoEPipeline
from .transformer import DiTMoETransformer2DModel

COMPONENTS = ("transformer", "scheduler", "vae")


def load_pipeline(folder: str | os.PathLike, torch_dtype: Optional[torch.dtype] = None) -> DiTMoEPipeline:
    """The pipeline in `folder` (written by `python -m dit_moe.diffusers export`), built from the
    installed dit_moe and diffusers classes; `torch_dtype` casts the transformer and VAE."""
    folder = Path(folder)
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise FileNotFoundError(
            f"{folder} holds no model_index.json; export one with python -m dit_moe.diffusers export."
        )
    index = json.loads(index_path.read_text())
    dtype = {} if torch_dtype is None else {"torch_dtype": torch_dtype}
    transformer = DiTMoETransformer2DModel.from_pretrained(folder, subfolder="transformer", **dtype)
    scheduler_class = getattr(diffusers, index["scheduler"][1])
    scheduler = scheduler_class.from_pretrained(folder, subfolder="scheduler")
    vae_library, vae_class = index.get("vae") or (None, None)
    vae = getattr(diffusers, vae_class).from_pretrained(folder, subfolder="vae", **dtype) if vae_class else None
    settings = {key: value for key, value in index.items() if not key.startswith("_") and key not in COMPONENTS}
    return DiTMoEPipeline(transformer=transformer, scheduler=scheduler, vae=vae, **settings)
