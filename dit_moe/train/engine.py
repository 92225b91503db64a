"""The only module that imports DeepSpeed: engine construction, ZeRO-3 leaf modules, EMA,
checkpoints that survive a kill at any moment, and gathering full weights for export.

Checkpoint layout under `<results>/checkpoints/`:
    step0000100/            DeepSpeed's files (model, optimizer, client state) plus
        ema.safetensors     full EMA weights (gathered under ZeRO-3)
        dit_config.json     the model's DiTConfig, so `load_model(dir)` works
        rng_rankR.pt        every rank's RNG states
        COMPLETE            written last: a tag without it is ignored
    latest                  name of the newest complete tag, replaced atomically
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Optional

import deepspeed
import numpy as np
import torch
import torch.distributed as dist
from deepspeed.utils import set_z3_leaf_modules
from safetensors.torch import load_file, save_file

from ..checkpoint import CONFIG_FILE, EMA_FILE
from ..models.moe import MoEFeedForward

COMPLETE_MARKER = "COMPLETE"
TAG_PREFIX = "step"


def zero_stage(ds_config: dict[str, Any]) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def offloads_optimizer(ds_config: dict[str, Any]) -> bool:
    device = ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    return device not in (None, "none")


def build_optimizer(model: torch.nn.Module, ds_config: dict[str, Any]) -> Optional[torch.optim.Optimizer]:
    """torch's AdamW from the config's optimizer section, fused where torch supports it.

    Handing DeepSpeed a torch optimizer avoids JIT-building its fused Adam op; with the optimizer
    offloaded to the CPU DeepSpeed's own CPU Adam is used instead (returns None).
    """
    if offloads_optimizer(ds_config):
        return None
    section = ds_config.pop("optimizer", {"type": "AdamW", "params": {}})
    if section.get("type", "AdamW").lower() not in ("adamw", "adam"):
        raise ValueError(f"Only AdamW is supported in the DeepSpeed config, got {section.get('type')!r}.")
    params = dict(section.get("params", {}))
    params.setdefault("lr", 1e-4)
    params["betas"] = tuple(params.get("betas", (0.9, 0.999)))
    params.pop("torch_adam", None)
    params.pop("adam_w_mode", None)
    trainable = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(trainable, fused=True, **params)


def initialize(model: torch.nn.Module, ds_config: dict[str, Any]):
    """Wrap `model` in a DeepSpeed engine; MoE layers become ZeRO-3 leaf modules (gathered whole)."""
    if zero_stage(ds_config) == 3:
        set_z3_leaf_modules(model, [MoEFeedForward])
    optimizer = build_optimizer(model, ds_config)
    if optimizer is not None:
        ds_config["zero_allow_untested_optimizer"] = True
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        model_parameters=None if optimizer is not None else [p for p in model.parameters() if p.requires_grad],
        config=ds_config,
    )
    return engine


def _is_partitioned(param: torch.nn.Parameter) -> bool:
    return hasattr(param, "ds_tensor")


class EMA:
    """Exponential moving average of the weights, in fp32.

    Under ZeRO-3 each rank averages only its own partition of every parameter (no
    communication per step); the full average is gathered only to save or export.
    """

    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.params = dict(module.named_parameters())
        self.shadow = {name: self._local(p).detach().float().clone() for name, p in self.params.items()}

    @staticmethod
    def _local(param: torch.nn.Parameter) -> torch.Tensor:
        return param.ds_tensor if _is_partitioned(param) else param.data

    @torch.no_grad()
    def update(self) -> None:
        for name, param in self.params.items():
            if param.requires_grad:
                self.shadow[name].lerp_(self._local(param).float(), 1.0 - self.decay)

    @torch.no_grad()
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Full fp32 EMA tensors (collective under ZeRO-3: every rank must call it)."""
        return {name: _gather_partition(self.shadow[name], p) for name, p in self.params.items()}

    @torch.no_grad()
    def load_full_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name, param in self.params.items():
            full = state[name].float()
            self.shadow[name].copy_(_local_partition(full, param) if _is_partitioned(param) else full)


def _gather_partition(shard: torch.Tensor, param: torch.nn.Parameter) -> torch.Tensor:
    if not _is_partitioned(param):
        return shard.detach().cpu()
    world = dist.get_world_size()
    gathered = shard.new_empty(shard.numel() * world)
    dist.all_gather_into_tensor(gathered, shard.contiguous())
    return gathered[: param.ds_numel].view(param.ds_shape).cpu()


def _local_partition(full: torch.Tensor, param: torch.nn.Parameter) -> torch.Tensor:
    size = param.ds_tensor.numel()
    flat = torch.zeros(size * dist.get_world_size(), dtype=full.dtype)
    flat[: full.numel()] = full.flatten()
    return flat[dist.get_rank() * size : (dist.get_rank() + 1) * size].to(param.ds_tensor.device)


@torch.no_grad()
def full_model_state_dict(engine) -> dict[str, torch.Tensor]:
    """Full weights of the engine's module in fp32 on CPU (collective under ZeRO-3)."""
    module = engine.module
    params = list(module.parameters())
    if any(_is_partitioned(p) for p in params):
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}
    return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}


def tag_for_step(step: int) -> str:
    return f"{TAG_PREFIX}{step:07d}"


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def complete_tags(checkpoint_dir: Path) -> list[str]:
    """Tags whose write finished, oldest first."""
    if not checkpoint_dir.is_dir():
        return []
    tags = [p.name for p in checkpoint_dir.iterdir() if p.is_dir() and (p / COMPLETE_MARKER).is_file()]
    return sorted(tags)


def latest_complete_tag(checkpoint_dir: Path) -> Optional[str]:
    """The tag named by `latest` if complete, else the newest complete tag (a kill mid-write)."""
    latest = checkpoint_dir / "latest"
    if latest.is_file():
        tag = latest.read_text().strip()
        if (checkpoint_dir / tag / COMPLETE_MARKER).is_file():
            return tag
    tags = complete_tags(checkpoint_dir)
    return tags[-1] if tags else None


def save_checkpoint(engine, ema: EMA, checkpoint_dir: Path, step: int, client_state: dict[str, Any],
                    model_config: dict[str, Any], keep_last: int) -> str:
    """Collective: write tag `stepNNNNNNN`, mark it complete, point `latest` at it, prune old tags."""
    tag = tag_for_step(step)
    tag_dir = checkpoint_dir / tag
    rank = dist.get_rank()
    if rank == 0 and tag_dir.exists():
        shutil.rmtree(tag_dir)  # a partial write of this step by a killed run
    dist.barrier()
    engine.save_checkpoint(str(checkpoint_dir), tag=tag, client_state=client_state, save_latest=False)
    ema_state = ema.full_state_dict()
    torch.save(_rng_state(), tag_dir / f"rng_rank{rank}.pt")
    if rank == 0:
        save_file({k: v.contiguous() for k, v in ema_state.items()}, str(tag_dir / EMA_FILE))
        (tag_dir / CONFIG_FILE).write_text(json.dumps(model_config, indent=2))
    dist.barrier()
    if rank == 0:
        _fsync_dir(tag_dir)
        (tag_dir / COMPLETE_MARKER).write_text(f"{step}\n")
        tmp = checkpoint_dir / "latest.tmp"
        tmp.write_text(tag)
        os.replace(tmp, checkpoint_dir / "latest")
        for old in complete_tags(checkpoint_dir)[:-keep_last]:
            shutil.rmtree(checkpoint_dir / old, ignore_errors=True)
    dist.barrier()
    return tag


def _fsync_dir(directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def load_checkpoint(engine, ema: EMA, checkpoint_dir: Path, tag: str) -> dict[str, Any]:
    """Restore engine (model, optimizer, scheduler), EMA and this rank's RNG; returns the client state."""
    load_path, client_state = engine.load_checkpoint(
        str(checkpoint_dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {checkpoint_dir / tag}.")
    ema.load_full_state_dict(load_file(str(checkpoint_dir / tag / EMA_FILE)))
    rng_file = checkpoint_dir / tag / f"rng_rank{dist.get_rank()}.pt"
    if rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=False))
    return client_state


def init_distributed() -> tuple[int, int, int, torch.device]:
    """(rank, local_rank, world_size, device) from the launcher's environment (deepspeed, torchrun,
    or none: a single process). The global rank is RANK, never LOCAL_RANK."""
    from deepspeed.accelerator import get_accelerator

    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()) if os.environ["WORLD_SIZE"] == "1" else "29500")
    accelerator = get_accelerator()
    backend = "gloo" if accelerator.device_name() == "cpu" else accelerator.communication_backend_name()
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    rank, local_rank = dist.get_rank(), int(os.environ["LOCAL_RANK"])
    if accelerator.device_name() == "cpu":
        device = torch.device("cpu")
    else:
        accelerator.set_device(local_rank)
        device = torch.device(accelerator.device_name(local_rank))
    return rank, local_rank, dist.get_world_size(), device


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
