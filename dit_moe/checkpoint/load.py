"""`load_model`: the one way to build a model from any supported checkpoint."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from ..models import DiT
from ..utils.errors import CheckpointError
from .infer import infer_config
from .provenance import TrainedAs
from .read import read_checkpoint_file


@dataclass
class LoadedModel:
    """A model built from a checkpoint, with what the file says about how it was trained."""

    model: DiT
    trained_as: TrainedAs  # the objective, recorded or judged from the keys, and where it comes from
    config_stored: bool  # True: the file holds the model config; False: rebuilt from tensor shapes
    run: dict[str, Any] = field(default_factory=dict)  # a trainer export's step, source tag, VAE and scale


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
    return LoadedModel(model.to(device).eval(), contents.trained_as, stored is not None, contents.run)
