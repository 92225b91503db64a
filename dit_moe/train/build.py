"""What a run trains, built from its TrainConfig: the model config (from --init-from's file or the
preset and flags), the model with its starting weights, and the optimizer-step hooks of its routers."""

from __future__ import annotations

import dataclasses
import logging
from typing import Optional

import torch
import torch.distributed as dist

from ..checkpoint import CheckpointContents, RecordedRun, infer_config
from ..data.vae import vae_geometry
from ..diffusion import ObjectiveConfig
from ..models import DiT, DiTConfig
from ..models.compile import compile_model
from ..models.config import TRAINING_ONLY_FIELDS
from ..models.router_sigmoid import register_expert_bias_update
from .sections import ARCHITECTURE_FIELDS, TrainConfig


def settle_with_record(
    cfg: TrainConfig, record: RecordedRun, instead: str, objective_may_change: bool = False
) -> TrainConfig:
    """`cfg` describing the checkpoint's run: its architecture and objective replace the defaults, so the
    start-up line and config.yaml say what is built; a flag that contradicts them stops (`RecordedRun.check`).
    `objective_may_change` (--init-from with --allow-objective-change) leaves the objective to the flags."""
    objective_names = {f.name for f in dataclasses.fields(ObjectiveConfig)}
    asked = cfg.asked("model", "objective")
    if objective_may_change:
        asked = {k: v for k, v in asked.items() if k not in objective_names}
    record.check(asked, instead)
    pinned = record.pinned()
    model = {k: v for k, v in pinned.items() if k in ARCHITECTURE_FIELDS}
    if record.preset is not None:
        model["model"] = record.preset
    objective = {} if objective_may_change else {k: v for k, v in pinned.items() if k in objective_names}
    return dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, **model),
        objective=dataclasses.replace(cfg.objective, **objective),
        data=dataclasses.replace(cfg.data, **_recorded_geometry(cfg, record)),
    )


def _recorded_geometry(cfg: TrainConfig, record: RecordedRun) -> dict:
    """The image size (and pixel channels) the record's model takes, for the data flags not given:
    pixels are the model's input, a VAE's latents are smaller by its downsampling factor."""
    if record.model is None or cfg.data.dataset in ("latents", "npy"):  # their manifests say it
        return {}
    downsample = 1 if cfg.data.pixel_space else vae_geometry(cfg.data.vae_path)[1]
    geometry = {"image_size": record.model.input_size * downsample}
    if cfg.data.pixel_space and record.model.in_channels in (1, 3):
        geometry["channels"] = record.model.in_channels
    return {k: v for k, v in geometry.items() if f"data.{k}" not in cfg.given}


log = logging.getLogger("dit_moe.train")


def build_model_config(
    cfg: TrainConfig, input_channels: int, input_size: int, num_classes: int, init: Optional[CheckpointContents] = None
) -> DiTConfig:
    """The DiTConfig for this run: the --init-from file's architecture (`init`, read once by the
    caller) with this run's training options, else the preset + flags."""
    if init is None:
        return cfg.model.architecture(input_size, input_channels, num_classes)
    base = init.model_config or infer_config(init.state_dict)
    config = base.replace(**{name: getattr(cfg.model, name) for name in TRAINING_ONLY_FIELDS})
    got = (config.in_channels, config.input_size, config.num_classes)
    if got != (input_channels, input_size, num_classes):
        raise ValueError(
            f"--init-from {cfg.model.init_from} is a model for (channels, size, classes) = {got}, but the data gives "
            f"{(input_channels, input_size, num_classes)}; use matching --image-size / --num-classes / --vae-path."
        )
    return config


def build_training_model(cfg: TrainConfig, config: DiTConfig, init: Optional[CheckpointContents] = None) -> DiT:
    """Same weights on every rank (ZeRO-3 partitions each rank's own copy), from --init-from (`init`) if given."""
    torch.manual_seed(cfg.run.seed)
    model = DiT(config)
    if init is not None:
        model.load_state_dict(init.state_dict)
    return compile_model(model, cfg.run.compile)


def register_router_updates(engine) -> None:
    """Hang the routers' per-step state updates on the engine's optimizer (torchtitan's
    `build_optimizers_with_moe_load_balancing`): the sigmoid-bias routers' aux-loss-free bias update,
    with the step's loads summed over ranks. A step DeepSpeed skips (fp16 overflow) never reaches the
    optimizer, so it updates nothing. Says at start-up how the sigmoid-bias routers balance."""
    module = engine.module
    if register_expert_bias_update(engine.basic_optimizer, module, dist.all_reduce) is None:
        return
    moe = module.config.moe
    log.info(
        "sigmoid-bias routers: auxiliary-loss-free balancing, bias += %g x sign(mean load - load) after every "
        "optimizer step; load-balancing loss coefficient %g%s.",
        moe.bias_update_rate,
        moe.aux_loss_coef,
        " (DeepSeek-V3 uses 1e-4 per sample: --aux-loss-coef 1e-4 --aux-loss-per-sample True)"
        if moe.aux_loss_coef == 0
        else "",
    )
