"""What a run trains, built from its TrainConfig: the model config (from --init-from's file or the
preset and flags), the model with its starting weights, and the optimizer-step hooks of its routers."""

from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.distributed as dist

from ..checkpoint import CheckpointContents, infer_config, objective_evidence
from ..diffusion import ObjectiveConfig
from ..models import DiT, DiTConfig
from ..models.compile import compile_model
from ..models.router_sigmoid import register_expert_bias_update
from .config import TRAINING_FIELDS, TrainConfig

log = logging.getLogger("dit_moe.train")


def build_model_config(
    cfg: TrainConfig, input_channels: int, input_size: int, num_classes: int, init: Optional[CheckpointContents] = None
) -> DiTConfig:
    """The DiTConfig for this run: the --init-from file's architecture (`init`, read once by the
    caller) with this run's training options, else the preset + flags."""
    if init is None:
        return cfg.model.architecture(input_size, input_channels, num_classes)
    if not cfg.model.allow_objective_change:
        check_init_objective(cfg, init)
    base = init.model_config or infer_config(init.state_dict)
    config = base.replace(**{name: getattr(cfg.model, name) for name in TRAINING_FIELDS})
    got = (config.in_channels, config.input_size, config.num_classes)
    if got != (input_channels, input_size, num_classes):
        raise ValueError(
            f"--init-from {cfg.model.init_from} is a model for (channels, size, classes) = {got}, but the data gives "
            f"{(input_channels, input_size, num_classes)}; use matching --image-size / --num-classes / --vae-path."
        )
    return config


def check_init_objective(cfg: TrainConfig, init: CheckpointContents) -> None:
    """Fine-tuning must continue the objective the file was trained with (recorded, or shown by its
    keys: `objective_evidence`); another objective or time scale stops, unless asked for on purpose."""
    trained, source = init.objective, "recorded in the file"
    if trained is None:
        trained, evidence = objective_evidence(init.state_dict)
        source = f"judged from {evidence}"
    if trained is None:
        return
    run = cfg.objective
    keys = ("objective", "flow_t_scale") if trained.objective == "flow" else ("objective",)
    if init.objective_source == "stored" and trained.objective == "iddpm":
        keys += ("noise_schedule", "diffusion_steps")
    changed = [key for key in keys if getattr(trained, key) != getattr(run, key)]
    if changed:
        was = ", ".join(f"{key} {getattr(trained, key)}" for key in changed)
        now = ", ".join(f"--{key.replace('_', '-')} {getattr(run, key)}" for key in changed)
        raise ValueError(
            f"--init-from {cfg.model.init_from} was trained with {was} ({source}), but this run has {now}; "
            f"pass the file's values (e.g. {_flags_for(trained, changed)}), or --allow-objective-change True "
            "to fine-tune it into another objective on purpose."
        )


def _flags_for(trained: ObjectiveConfig, keys: list[str]) -> str:
    flags = {"objective": f"--rf {trained.objective == 'flow'}"}
    return " ".join(flags.get(key, f"--{key.replace('_', '-')} {getattr(trained, key)}") for key in keys)


def build_model(cfg: TrainConfig, config: DiTConfig, init: Optional[CheckpointContents] = None) -> DiT:
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
