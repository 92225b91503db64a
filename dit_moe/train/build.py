"""What a run trains, built from its TrainConfig: the model config (from --init-from's file or the
preset and flags), the model with its starting weights, and the objective's options."""

from __future__ import annotations

from typing import Any

import torch

from ..checkpoint import infer_config, read_checkpoint
from ..models import DiT, DiTConfig, preset_config
from .config import TrainConfig


def build_model_config(cfg: TrainConfig, input_channels: int, input_size: int, num_classes: int) -> DiTConfig:
    """The DiTConfig for this run: from --init-from's file when given, else the preset + flags."""
    m, o = cfg.model, cfg.objective
    training = dict(
        grad_checkpointing=m.grad_checkpointing, attn_backend=m.attn_backend, aux_loss_coef=m.aux_loss_coef,
        aux_loss_per_sample=m.aux_loss_per_sample, z_loss_coef=m.z_loss_coef, capacity_factor=m.capacity_factor,
        class_dropout_prob=m.class_dropout_prob, objective=o.objective, flow_t_scale=o.flow_t_scale,
    )
    if m.init_from:
        stored, state = read_checkpoint(m.init_from)
        base = stored or infer_config(state)
        config = base.replace(**training)
        got = (config.in_channels, config.input_size, config.num_classes)
        if got != (input_channels, input_size, num_classes):
            raise ValueError(
                f"--init-from {m.init_from} is a model for (channels, size, classes) = {got}, but the data gives "
                f"{(input_channels, input_size, num_classes)}; use matching --image-size / --num-classes / --vae-path."
            )
        return config
    return preset_config(
        m.model, input_size=input_size, in_channels=input_channels, num_classes=num_classes,
        learn_sigma=m.learn_sigma, qk_norm=m.qk_norm, num_experts=m.num_experts,
        num_experts_per_tok=m.num_experts_per_tok, n_shared_experts=m.n_shared_experts,
        expert_type=m.expert_type, moe_layers=m.moe_layers, norm_topk_prob=m.norm_topk_prob,
        decoder_depth=m.decoder_depth, decoder_hidden_size=m.decoder_hidden_size,
        decoder_num_heads=m.decoder_num_heads, **training,
    )


def build_model(cfg: TrainConfig, config: DiTConfig) -> DiT:
    """Same weights on every rank (ZeRO-3 partitions each rank's own copy), from --init-from if given."""
    torch.manual_seed(cfg.run.seed)
    model = DiT(config)
    if cfg.model.init_from:
        _, state = read_checkpoint(cfg.model.init_from, prefer_ema=True)
        model.load_state_dict(state)
    return model


def objective_options(cfg: TrainConfig, learn_sigma: bool) -> dict[str, Any]:
    o = cfg.objective
    if o.objective == "iddpm":
        sampler = "uniform" if o.timestep_sampler == "auto" else o.timestep_sampler
        return dict(noise_schedule=o.noise_schedule, diffusion_steps=o.diffusion_steps, learn_sigma=learn_sigma,
                    timestep_sampler=sampler)
    sampler = "logit-normal" if o.timestep_sampler == "auto" else o.timestep_sampler
    return dict(learn_sigma=learn_sigma, t_scale=o.flow_t_scale, timestep_sampler=sampler)
