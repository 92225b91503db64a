"""The world-size-independent training state: resume a run on another number of processes, nodes,
--ep-size or ZeRO stage, exactly.

`save_full_state` writes one file beside DeepSpeed's per-rank files (`layout.FULL_STATE_FILE`):
for every trainable parameter its full fp32 master weight and every optimizer moment (Adam's `exp_avg`,
`exp_avg_sq`), routed experts gathered to their full [E, ...] tensors in global expert order; the frozen
parameters and buffers; and in the header JSON the optimizer step and hyper-parameters, DeepSpeed's
step counters, the learning-rate scheduler, the loss scaler and the trainer's client state (step, data
position). `load_full_state` puts it back through DeepSpeed's public fragment API
(`safe_set_full_fp32_param` / `safe_set_full_optimizer_state`), which copies into whatever partition
this rank owns under ZeRO-1, 2 or 3 of the new world size, after each expert-parallel rank has sliced
out its own experts. Model weights are the master weights cast to the model's dtype, which is what
DeepSpeed's optimizer step leaves them as.

Why gather at save time rather than convert at load time with DeepSpeed's universal checkpoints
(`ds_to_universal` + `"checkpoint": {"load_universal": true}`): tried on DeepSpeed 0.19.8, CPU, gloo, DiT-T/2
4 experts. Without expert parallelism the converter works (ZeRO-2 and ZeRO-3 tags, given
`--inject_missing_state` since we save no `universal_checkpoint_info`) and a ZeRO-2 tag of 2 ranks loads
exactly on 1. With --ep-size 2 it fails ("shape '[2, 128, 512]' is invalid for input of size 262144"): it
concatenates every rank's partition of a parameter group, but our expert groups are partitioned over the
expert-data-parallel group and each expert-parallel rank holds other experts under the same names (DeepSpeed
issue #5716; its AutoEP resharding covers only its own MoE layer). One mechanism for ZeRO-1/2/3 and every
--ep-size, with no conversion step and no second copy written at resume time, is simpler to trust than
DeepSpeed's path plus ours for experts. The price, measured by `bench/resume.py`: every checkpoint is
12 bytes per parameter larger (fp32 master + two moments), and rank 0 holds those 12 bytes per parameter in
host memory while writing; `--elastic-checkpoints false` turns it off (such a tag resumes on its own shape only).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator, Optional

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.moe.utils import is_moe_param
from deepspeed.utils import (
    safe_get_full_fp32_param,
    safe_get_full_optimizer_state,
    safe_set_full_fp32_param,
    safe_set_full_optimizer_state,
)
from safetensors import safe_open
from safetensors.torch import save_file

from ..checkpoint.layout import RunShape
from ..parallel import ExpertParallel
from ..utils.atomic import atomic_path

MASTER = "fp32"  # key prefix of the master weights; optimizer moments use their own state names
FROZEN = "frozen"  # parameters without gradients and buffers (floating ones in fp32)
META_KEY = "dit_moe_train_state"
HYPERPARAMETERS = ("lr", "betas", "eps", "weight_decay")  # what a config or scheduler sets per group
FORMAT_VERSION = 1


def _base_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer inside DeepSpeed's ZeRO wrapper, stepping the flat fp32 partitions."""
    return engine.optimizer.optimizer


def _hp_params(engine) -> list[torch.Tensor]:
    """The flat fp32 partitions the optimizer steps (ZeRO-3 binds them to its param groups only while stepping)."""
    zero = engine.optimizer
    return list(
        zero.fp32_partitioned_groups_flat
        if engine.zero_optimization_stage() == 3
        else zero.single_partition_of_fp32_groups
    )


def _moment_keys(engine) -> tuple[str, ...]:
    """The optimizer's per-element state names (none before the first step: moments are created lazily)."""
    base = _base_optimizer(engine)
    for param in _hp_params(engine):
        state = base.state.get(param)
        if state:
            return tuple(sorted(k for k, v in state.items() if torch.is_tensor(v) and v.shape == param.shape))
    return ()


def _optimizer_step(engine) -> Optional[int]:
    base = _base_optimizer(engine)
    for param in _hp_params(engine):
        if "step" in base.state.get(param, {}):
            return int(base.state[param]["step"])
    return None


def _trainable(module: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Parameter]]:
    return ((name, p) for name, p in module.named_parameters() if p.requires_grad)


def _frozen_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full copies of the state-dict entries the optimizer does not own, floating ones in fp32 (collective
    under ZeRO-3)."""
    trainable = {name for name, _ in _trainable(module)}
    frozen = [p for name, p in module.named_parameters() if name not in trainable]
    with deepspeed.zero.GatheredParameters(frozen, modifier_rank=None):
        state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items() if k not in trainable}
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def _scalars(obj: Any) -> dict[str, Any]:
    return {k: v for k, v in vars(obj).items() if isinstance(v, (bool, int, float))}


def _metadata(engine, client_state: dict[str, Any], shape: RunShape) -> dict[str, Any]:
    """Everything but the tensors: JSON, so a reader needs no pickle."""
    group = _base_optimizer(engine).param_groups[0]
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    return {
        "version": FORMAT_VERSION,
        "shape": asdict(shape),
        "moment_keys": list(_moment_keys(engine)),
        "optimizer_step": _optimizer_step(engine),
        "hyperparameters": {k: group[k] for k in HYPERPARAMETERS if k in group},
        "counters": {k: getattr(engine, k) for k in ("global_steps", "global_samples", "skipped_steps")},
        "lr_scheduler": engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None,
        "loss_scaler": _scalars(scaler) if scaler is not None else {},
        "client": client_state,
    }


def _full(param: torch.nn.Parameter, key: str, ep: Optional[ExpertParallel]) -> torch.Tensor:
    """The whole tensor of `param`'s master weight or moment `key` (collective over its partition group)."""
    full = safe_get_full_fp32_param(param) if key == MASTER else safe_get_full_optimizer_state(param, key)
    if ep is not None and is_moe_param(param):
        full = ep.gather_experts(full)  # [E_l, ...] per expert-parallel rank -> [E, ...]
    return full.detach().float().cpu()


def save_full_state(
    engine, path: Path, ep: Optional[ExpertParallel], client_state: dict[str, Any], shape: RunShape
) -> None:
    """Collective: every rank joins the gathers; rank 0 keeps the tensors and writes `path` whole or not at all."""
    is_writer = dist.get_rank() == 0
    metadata = _metadata(engine, client_state, shape)
    if metadata["moment_keys"]:
        _link_moments(engine)
    tensors: dict[str, torch.Tensor] = {}
    for name, param in _trainable(engine.module):
        for key in (MASTER, *metadata["moment_keys"]):
            full = _full(param, key, ep)
            if is_writer:
                tensors[f"{key}/{name}"] = full.contiguous()
    frozen = _frozen_state(engine.module)
    if is_writer:
        tensors.update({f"{FROZEN}/{k}": v.contiguous() for k, v in frozen.items()})
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={META_KEY: json.dumps(metadata)})


def read_metadata(path: Path) -> dict[str, Any]:
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()[META_KEY])


def _full_shape(param: torch.nn.Parameter, ep: Optional[ExpertParallel]) -> tuple[int, ...]:
    shape = tuple(getattr(param, "ds_shape", param.shape))
    if ep is not None and is_moe_param(param):
        return (ep.num_experts, *shape[1:])
    return shape


def _read(f, key: str, param: torch.nn.Parameter, ep: Optional[ExpertParallel]) -> torch.Tensor:
    """This rank's part of a saved full tensor: its own experts under expert parallelism, else all of it."""
    stored, expected = tuple(f.get_slice(key).get_shape()), _full_shape(param, ep)
    if stored != expected:
        raise ValueError(
            f"The checkpoint's {key} has shape {list(stored)} but this model's is {list(expected)}: the model "
            "differs from the one that wrote it; resume with the checkpoint's model flags (its dit_config.json)."
        )
    if ep is not None and is_moe_param(param):
        return f.get_slice(key)[ep.first_expert : ep.first_expert + ep.num_local]
    return f.get_tensor(key)


def _materialize_optimizer_state(engine) -> None:
    """Create the optimizer's moments the optimizer's own way (torch creates them at the first step), so
    that their values can be set: one step on zero gradients at learning rate 0."""
    base, params = _base_optimizer(engine), _hp_params(engine)
    learning_rates = [group["lr"] for group in base.param_groups]
    for group in base.param_groups:
        group["lr"] = 0.0
    for param in params:
        param.grad = torch.zeros_like(param)
    if engine.zero_optimization_stage() == 3:
        engine.optimizer._set_fp32_optimizer_param_groups()
    base.step()
    if engine.zero_optimization_stage() == 3:
        engine.optimizer._clear_fp32_optimizer_param_groups()
    for param in params:
        param.grad = None
    for group, lr in zip(base.param_groups, learning_rates):
        group["lr"] = lr
    _link_moments(engine)


def _link_moments(engine) -> None:
    """Point every parameter's moment fragments at the optimizer's moments (ZeRO-1/2).

    DeepSpeed 0.19.8 links them once, right after stepping the first parameter group, when the other
    groups (our expert groups) have no moments yet, so their fragments stay empty: link again."""
    if engine.zero_optimization_stage() in (1, 2):
        engine.optimizer._hp_optimizer_states_linked = False
        engine.optimizer._lazy_init_hp_params_optimizer_state()


@torch.no_grad()
def _load_weights(engine, f, ep: Optional[ExpertParallel]) -> None:
    """Model weights = master weights in the model's dtype; frozen entries as saved (collective under ZeRO-3)."""
    module = engine.module
    params = dict(module.named_parameters())
    writes = engine.zero_optimization_stage() != 3 or dist.get_rank() == 0  # ZeRO-3: rank 0, then re-partitioned
    with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0):
        for name, param in params.items() if writes else ():
            key = f"{MASTER}/{name}" if param.requires_grad else f"{FROZEN}/{name}"
            param.data.copy_(_read(f, key, param, ep).to(param.dtype))
    for name, buffer in module.named_buffers():
        if f"{FROZEN}/{name}" in f.keys():
            buffer.copy_(f.get_tensor(f"{FROZEN}/{name}"))


def _restore_counters(engine, meta: dict[str, Any]) -> None:
    base = _base_optimizer(engine)
    for group in base.param_groups:
        group.update(meta["hyperparameters"])
    step = meta["optimizer_step"]
    if step is not None:
        for state in base.state.values():
            state["step"] = torch.full_like(state["step"], step) if torch.is_tensor(state["step"]) else step
    for name, value in meta["counters"].items():
        setattr(engine, name, value)
    if engine.lr_scheduler is not None and meta["lr_scheduler"] is not None:
        engine.lr_scheduler.load_state_dict(meta["lr_scheduler"])
    for name, value in meta["loss_scaler"].items():
        setattr(engine.optimizer.loss_scaler, name, value)


@torch.no_grad()
def load_full_state(engine, path: Path, ep: Optional[ExpertParallel]) -> dict[str, Any]:
    """Restore weights, master weights, optimizer moments and counters from `path` onto this engine's
    partitioning (collective under ZeRO-3); returns the client state saved with them."""
    meta = read_metadata(path)
    keys = meta["moment_keys"]
    if keys:
        _materialize_optimizer_state(engine)
    with safe_open(str(path), framework="pt") as f:
        _load_weights(engine, f, ep)
        for name, param in _trainable(engine.module):
            safe_set_full_fp32_param(param, _read(f, f"{MASTER}/{name}", param, ep))
            for key in keys:
                safe_set_full_optimizer_state(param, _read(f, f"{key}/{name}", param, ep), key)
    _restore_counters(engine, meta)
    return meta["client"]
