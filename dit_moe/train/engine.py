"""The only module that imports DeepSpeed: its config for this run, engine construction, ZeRO-3 leaf
modules, expert-parallel groups, EMA, checkpoints that survive a kill at any moment, and gathering
full weights for export.

Expert parallelism (`--ep-size N`) uses DeepSpeed's own MoE machinery: its expert-parallel and
expert-data-parallel groups, expert parameters marked as its MoE layer marks them
(`allreduce = False`, `group_name`), and optimizer groups split by its helper, so ZeRO-1/2
partitions and reduces expert gradients over the expert-data-parallel group only.

Checkpoints follow the layout `dit_moe.checkpoint.layout` documents and names. A resume on the shape
that wrote the tag (processes, --ep-size, ZeRO stage) goes through DeepSpeed's own loader; on any other
shape through `dit_moe.train.reshard`, this module's resharding half (the other module that imports DeepSpeed).
"""

from __future__ import annotations

import atexit
import os
import random
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import deepspeed
import numpy as np
import torch
import torch.distributed as dist
from deepspeed.moe.layer import MoE as DeepSpeedMoE
from deepspeed.moe.utils import is_moe_param, split_params_into_different_moe_groups_for_optimizer
from deepspeed.utils import groups, set_z3_leaf_modules
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..checkpoint import layout
from ..models.moe import MoEFeedForward
from ..parallel import ExpertParallel, shard_experts
from ..utils.atomic import atomic_path
from ..utils.host_memory import keep_freed_memory
from ..utils.launch import LaunchEnv, free_port
from . import reshard
from .batch import BatchPlan
from .deepspeed_config import load_deepspeed_config
from .disk import CheckpointSpace
from .sections import RunSection

EXPERT_PARALLEL_STAGES = (1, 2)
QUIET_STEPS_PER_PRINT = 10**9  # DeepSpeed prints nothing of its own: the trainer logs


def apply_precision(ds_config: dict[str, Any], precision: str, device: torch.device) -> str:
    """Resolve "auto" (the config's choice on GPU, fp32 on CPU) and write it into the config."""
    if precision == "auto":
        if device.type == "cpu":
            precision = "fp32"
        elif ds_config.get("bf16", {}).get("enabled"):
            precision = "bf16"
        elif ds_config.get("fp16", {}).get("enabled"):
            precision = "fp16"
        else:
            precision = "fp32"
    ds_config.setdefault("bf16", {})["enabled"] = precision == "bf16"
    ds_config.setdefault("fp16", {})["enabled"] = precision == "fp16"
    return precision


def prepare_deepspeed_config(
    run: RunSection, world_size: int, device: torch.device, resumed: Optional[layout.RunShape] = None
) -> tuple[dict[str, Any], BatchPlan, str]:
    """The DeepSpeed config for this run, with the batch plan and precision it was resolved to.

    The JSON holds engine settings; the run's flags decide the rest: batch sizes (reconciled once
    by `BatchPlan` and written back, so DeepSpeed owns gradient accumulation; a resume keeps the
    global batch of `resumed`, the shape of the checkpoint), --lr, --precision.
    """
    ds_config = load_deepspeed_config(run.deepspeed_config)
    check_expert_parallel(run.ep_size, ds_config, world_size)
    if resumed is not None and resumed.global_batch is not None:
        plan = BatchPlan.for_resume(run, world_size, resumed.global_batch, resumed.grad_accum)
    else:
        plan = BatchPlan.resolve(run, world_size, ds_config)
    ds_config.update(
        train_micro_batch_size_per_gpu=plan.micro_batch,
        gradient_accumulation_steps=plan.grad_accum,
        train_batch_size=plan.global_batch,
    )
    ds_config.setdefault("steps_per_print", QUIET_STEPS_PER_PRINT)
    if run.lr is not None:
        ds_config.setdefault("optimizer", {"type": "AdamW", "params": {}}).setdefault("params", {})["lr"] = run.lr
    return ds_config, plan, apply_precision(ds_config, run.precision, device)


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
    if any(is_moe_param(p) for p in trainable):  # expert parallelism: expert params in their own groups
        return torch.optim.AdamW(
            split_params_into_different_moe_groups_for_optimizer({"params": trainable, "name": "params"}),
            fused=True,
            **params,
        )
    return torch.optim.AdamW(trainable, fused=True, **params)


def check_expert_parallel(ep_size: int, ds_config: dict[str, Any], world_size: int) -> None:
    """Start-up check of --ep-size against the ZeRO stage and the number of processes."""
    if ep_size == 1:
        return
    if zero_stage(ds_config) not in EXPERT_PARALLEL_STAGES:
        raise ValueError(
            f"--ep-size {ep_size} works with ZeRO stage 1 or 2 (config/zero1.json, config/zero2.json), "
            f"not with stage {zero_stage(ds_config)}; pick one of those configs or use --ep-size 1."
        )
    if world_size % ep_size:
        raise ValueError(f"--ep-size {ep_size} must divide the number of processes ({world_size}).")


def expert_group_name(ep_size: int) -> str:
    """DeepSpeed's name for the expert-parallel groups of size `ep_size` (its MoE layer's `group_name`)."""
    return f"ep_size_{ep_size}"


def setup_expert_parallel(model: torch.nn.Module, ep_size: int) -> Optional[ExpertParallel]:
    """Create DeepSpeed's expert-parallel groups, keep this rank's experts and mark them as DeepSpeed's
    MoE layer marks expert parameters; None when ep_size is 1 (nothing changes)."""
    if ep_size == 1:
        return None
    layers = [m for m in model.modules() if isinstance(m, MoEFeedForward)]
    if not layers:
        raise ValueError(f"--ep-size {ep_size} needs an MoE model; set --num-experts > 0 or use --ep-size 1.")
    num_experts = layers[0].args.num_experts
    if num_experts % ep_size:
        raise ValueError(f"--ep-size {ep_size} must divide the number of experts ({num_experts}).")
    name = expert_group_name(ep_size)
    if name not in groups._get_expert_parallel_group_dict():
        groups._create_expert_and_data_parallel(ep_size)
    ep = ExpertParallel(groups._get_expert_parallel_group(name), num_experts)
    for param in shard_experts(model, ep):
        param.allreduce = False  # reduce over the expert-data-parallel group only
        param.group_name = name
    return ep


class _MoEFlag(DeepSpeedMoE):
    """A parameter-free stand-in that makes DeepSpeed's engine see an MoE model.

    DeepSpeed turns on its expert handling (`has_moe_layers`: ZeRO-1/2 partition and reduce the
    marked expert parameters over their expert-data-parallel group) only when the module tree
    holds an instance of its own `MoE` class. This one is attached for `deepspeed.initialize`
    only. It declares no local experts, so DeepSpeed writes and reads no per-expert files:
    `save_checkpoint` stores each rank's expert shard itself.
    """

    def __init__(self, num_experts: int, ep_size: int) -> None:
        torch.nn.Module.__init__(self)
        self.num_experts = num_experts
        self.ep_size = ep_size
        self.expert_group_name = expert_group_name(ep_size)
        self.num_local_experts = 0

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """Nothing to do: `setup_expert_parallel` created the groups."""


def initialize(model: torch.nn.Module, ds_config: dict[str, Any], ep: Optional[ExpertParallel] = None):
    """Wrap `model` in a DeepSpeed engine; MoE layers become ZeRO-3 leaf modules (gathered whole)."""
    if zero_stage(ds_config) == 3:
        set_z3_leaf_modules(model, [MoEFeedForward])
    optimizer = build_optimizer(model, ds_config)
    if optimizer is not None:
        ds_config["zero_allow_untested_optimizer"] = True
    if ep is not None:
        model.add_module("_deepspeed_moe_flag", _MoEFlag(ep.num_experts, ep.size))
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        model_parameters=None if optimizer is not None else [p for p in model.parameters() if p.requires_grad],
        config=ds_config,
    )
    if ep is not None:
        del model._deepspeed_moe_flag
        if not engine.has_moe_layers:
            raise RuntimeError("DeepSpeed did not enable its MoE handling; expert gradients would be reduced wrongly.")
    return engine


def _is_partitioned(param: torch.nn.Parameter) -> bool:
    return hasattr(param, "ds_tensor")


class EMA:
    """Exponential moving average of the weights, in fp32.

    Under ZeRO-3 each rank averages only its own partition of every parameter (no
    communication per step); the full average is gathered only to save or export.
    Persistent buffers (router state such as a balancing bias) are not averaged: the full
    state holds the live module's, so an EMA state dict loads into the model on its own.
    """

    def __init__(self, module: torch.nn.Module, decay: float, ep: Optional[ExpertParallel] = None):
        self.decay = decay
        self.ep = ep  # expert parallelism: expert tensors hold this rank's experts, gathered to save
        self.params = dict(module.named_parameters())
        persistent = module.state_dict().keys()
        self.buffers = {name: b for name, b in module.named_buffers() if name in persistent}
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
        """Full fp32 EMA tensors and the live persistent buffers (collective under ZeRO-3: every rank must call it)."""
        buffers = {name: b.detach().float().cpu().clone() for name, b in self.buffers.items()}
        if self.ep is not None:
            return {
                name: (self.ep.gather_experts(self.shadow[name]) if is_moe_param(p) else self.shadow[name]).cpu()
                for name, p in self.params.items()
            } | buffers
        return {name: _gather_partition(self.shadow[name], p) for name, p in self.params.items()} | buffers

    @torch.no_grad()
    def load_full_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name, param in self.params.items():
            full = state[name].float()
            if self.ep is not None and is_moe_param(param):
                full = self.ep.local_slice(full)
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
def full_model_state_dict(engine, ep: Optional[ExpertParallel] = None) -> dict[str, torch.Tensor]:
    """Full weights of the engine's module in fp32 on CPU (collective under ZeRO-3 or expert parallelism)."""
    module = engine.module
    params = list(module.parameters())
    if any(_is_partitioned(p) for p in params):
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}
    if ep is not None:
        experts = {name for name, p in module.named_parameters() if is_moe_param(p)}
        return {
            k: (ep.gather_experts(v) if k in experts else v).detach().float().cpu().clone()
            for k, v in module.state_dict().items()
        }
    return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _load_rng_state(path: Path) -> dict[str, Any]:
    """A rank's saved RNG state, read safely (weights_only): numpy's generator state is the one non-tensor."""
    array = np.zeros(1, dtype=np.uint32)
    numpy_globals = [array.__reduce__()[0], np.ndarray, np.dtype, type(array.dtype)]
    with torch.serialization.safe_globals(numpy_globals):
        return torch.load(path, weights_only=True)


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(
    engine,
    ema: EMA,
    checkpoint_dir: Path,
    step: int,
    client_state: dict[str, Any],
    model_config: dict[str, Any],
    objective_config: dict[str, Any],
    keep_last: int,
    space: CheckpointSpace,
    ep: Optional[ExpertParallel] = None,
    plan: Optional[BatchPlan] = None,
    elastic: bool = True,
) -> str:
    """Collective: write tag `stepNNNNNNN`, mark it complete, point `latest` at it, prune old tags.

    Every write runs under `space.guard`, so a full disk on any rank ends on every rank in `DiskFull`
    with the partial tag removed (`space.agree`), never in a hang or a half-written checkpoint.
    `elastic` adds the world-size-independent state (`reshard.save_full_state`) that lets the tag resume
    on another shape; `plan` is recorded with the shape, so such a resume keeps the global batch."""
    tag = layout.tag_for_step(step)
    tag_dir = checkpoint_dir / tag
    rank = dist.get_rank()
    if rank == 0 and tag_dir.exists():
        shutil.rmtree(tag_dir)  # a partial write of this step by a killed run
    dist.barrier()
    shape = run_shape(engine, ep, plan)
    with _guarded_engine_writes(engine, space):
        engine.save_checkpoint(str(checkpoint_dir), tag=tag, client_state=client_state, save_latest=False)
    if elastic and shape.zero_stage > 0:
        with space.guard(layout.full_state_file(tag_dir)):
            reshard.save_full_state(engine, layout.full_state_file(tag_dir), ep, client_state, shape)
    ema_state = ema.full_state_dict()
    with space.guard(layout.rng_file(tag_dir, rank)), atomic_path(layout.rng_file(tag_dir, rank)) as tmp:
        torch.save(_rng_state(), tmp)
    if ep is not None:
        with space.guard(layout.expert_shard(tag_dir, ep.rank)):
            _save_expert_shard(engine.module, ep, tag_dir)
    if rank == 0:
        with space.guard(tag_dir / layout.EMA_FILE), atomic_path(tag_dir / layout.EMA_FILE) as tmp:
            save_file({k: v.contiguous() for k, v in ema_state.items()}, str(tmp))
        with space.guard(tag_dir / layout.CONFIG_FILE):
            layout.write_configs(tag_dir, model_config, objective_config)
            layout.write_shape(tag_dir, shape)
    space.agree(tag_dir)
    if rank == 0:
        with space.guard(tag_dir / layout.COMPLETE_MARKER):
            layout.mark_complete(checkpoint_dir, tag, step)
    space.agree(tag_dir)
    if rank == 0:
        layout.prune(checkpoint_dir, keep_last)
    dist.barrier()
    return tag


@contextmanager
def _guarded_engine_writes(engine, space: CheckpointSpace) -> Iterator[None]:
    """Run each of DeepSpeed's checkpoint file writes (`checkpoint_engine.save`) under `space.guard`.

    Guarding each file rather than the whole `engine.save_checkpoint` call keeps a rank whose write
    failed on DeepSpeed's path through its barriers and gathers, so the other ranks do not hang.
    """
    checkpoint_engine = engine.checkpoint_engine
    save = checkpoint_engine.save

    def guarded_save(state_dict, path):
        with space.guard(Path(path)):
            save(state_dict, path)

    checkpoint_engine.save = guarded_save  # an instance attribute over the method, removed below
    try:
        yield
    finally:
        del checkpoint_engine.save


def _save_expert_shard(module: torch.nn.Module, ep: ExpertParallel, tag_dir: Path) -> None:
    """This expert-parallel rank's experts (DeepSpeed's model file holds rank 0's only); the first
    rank of each expert-data-parallel group writes, the others hold the same weights."""
    name = expert_group_name(ep.size)
    if groups._get_expert_data_parallel_rank(name) != 0:
        return
    shard = {k: p.detach().cpu().contiguous() for k, p in module.named_parameters() if is_moe_param(p)}
    metadata = {"ep_size": str(ep.size), "ep_rank": str(ep.rank), "num_experts": str(ep.num_experts)}
    with atomic_path(layout.expert_shard(tag_dir, ep.rank)) as tmp:
        save_file(shard, str(tmp), metadata=metadata)


def saved_ep_size(tag_dir: Path) -> int:
    """The --ep-size a checkpoint tag was written with (1 when it holds no expert shards)."""
    shard = layout.expert_shard(tag_dir, 0)
    if not shard.is_file():
        return 1
    with safe_open(str(shard), framework="pt") as f:
        return int(f.metadata()["ep_size"])


def run_shape(engine, ep: Optional[ExpertParallel], plan: Optional[BatchPlan] = None) -> layout.RunShape:
    """This run's shape, as `shape.json` records it."""
    batch = (plan.global_batch, plan.micro_batch, plan.grad_accum) if plan is not None else (None, None, None)
    return layout.RunShape(
        dist.get_world_size(), 1 if ep is None else ep.size, engine.zero_optimization_stage(), *batch
    )


def saved_shape(tag_dir: Path, zero_stage: int) -> layout.RunShape:
    """The shape that wrote the tag; for tags older than `shape.json`, what its files show (the stage
    they cannot show is taken to be this run's)."""
    shape = layout.read_shape(tag_dir)
    if shape is not None:
        return shape
    written_by = layout.rng_file_count(tag_dir) or dist.get_world_size()
    return layout.RunShape(written_by, saved_ep_size(tag_dir), zero_stage)


def check_reshardable(tag_dir: Path, saved: layout.RunShape, current: layout.RunShape) -> None:
    """A tag resumes on another shape only from its full state, and only under ZeRO-1/2/3: else one sentence."""
    if saved.layout == current.layout:
        return
    if current.zero_stage == 0 or saved.zero_stage == 0:
        raise ValueError(
            f"Checkpoint {tag_dir} was written by {saved.describe()} and this run is {current.describe()}: "
            f"resharding needs ZeRO stage 1, 2 or 3 on both sides; resume it with its own shape."
        )
    if not layout.full_state_file(tag_dir).is_file():
        raise ValueError(
            f"Checkpoint {tag_dir} was written by {saved.describe()} and this run is {current.describe()}, but it "
            f"holds no {layout.FULL_STATE_FILE} (written with --elastic-checkpoints false, or by an older dit-moe), "
            f"so ZeRO's optimizer shards cannot be re-split: resume it with {saved.describe()}, or start a new run "
            f"from its weights with --init-from {tag_dir} (the optimizer state restarts)."
        )


def load_checkpoint(
    engine, ema: EMA, checkpoint_dir: Path, tag: str, ep: Optional[ExpertParallel] = None
) -> dict[str, Any]:
    """Restore engine (model, optimizer, scheduler), EMA and this rank's RNG; returns the client state.

    The same shape loads DeepSpeed's own files; another shape loads the full state and reshards it. Rank r
    of a larger world takes the RNG of rank r mod the old world size: the training draws do not use it
    (they are seeded per global micro-batch), only code outside the step would."""
    tag_dir = checkpoint_dir / tag
    current = run_shape(engine, ep)
    saved = saved_shape(tag_dir, current.zero_stage)
    check_reshardable(tag_dir, saved, current)
    if saved.layout == current.layout:
        client_state = _load_same_shape(engine, checkpoint_dir, tag, ep)
    else:
        client_state = reshard.load_full_state(engine, layout.full_state_file(tag_dir), ep)
    ema.load_full_state_dict(load_file(str(tag_dir / layout.EMA_FILE)))
    _set_rng_state(_load_rng_state(layout.rng_file(tag_dir, dist.get_rank() % saved.world_size)))
    return client_state


def _load_same_shape(engine, checkpoint_dir: Path, tag: str, ep: Optional[ExpertParallel]) -> dict[str, Any]:
    """DeepSpeed's loader, then this expert-parallel rank's expert shard (DeepSpeed's model file holds rank 0's)."""
    load_path, client_state = engine.load_checkpoint(
        str(checkpoint_dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {checkpoint_dir / tag}.")
    if ep is not None:
        shard = load_file(str(layout.expert_shard(checkpoint_dir / tag, ep.rank)))
        with torch.no_grad():
            for name, param in engine.module.named_parameters():
                if is_moe_param(param):
                    param.copy_(shard[name])
    return client_state


def _unlink_shm_buffer_at_exit(rank: int) -> None:
    """DeepSpeed's CPU all-reduce op (csrc/cpu/comm/shm.cpp) creates a ~69 MB /dev/shm buffer per
    process, named by uid, MASTER_ADDR, MASTER_PORT and rank, and never unlinks it: every CPU run
    leaked one (21 GB of /dev/shm after a day of tests here). Peers map each other's buffers at
    start-up, so removing this process's name when it exits is safe."""
    name = "_".join(
        (
            "deepspeed_allreduce_buffer",
            str(os.getuid()),
            os.environ["MASTER_ADDR"],
            os.environ["MASTER_PORT"],
            str(rank),
        )
    )
    atexit.register(Path("/dev/shm", name).unlink, missing_ok=True)


def init_distributed() -> tuple[int, int, int, torch.device]:
    """(rank, local_rank, world_size, device) from the launcher's environment (deepspeed, torchrun,
    or none: a single process). The global rank is RANK, never LOCAL_RANK."""
    from deepspeed.accelerator import get_accelerator

    launch = LaunchEnv.from_environ()
    os.environ.setdefault("RANK", str(launch.rank))
    os.environ.setdefault("LOCAL_RANK", str(launch.local_rank))
    os.environ.setdefault("WORLD_SIZE", str(launch.world_size))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()) if launch.world_size == 1 else "29500")
    accelerator = get_accelerator()
    backend = "gloo" if accelerator.device_name() == "cpu" else accelerator.communication_backend_name()
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    if accelerator.device_name() == "cpu":
        _unlink_shm_buffer_at_exit(dist.get_rank())
        keep_freed_memory()
        device = torch.device("cpu")
    else:
        accelerator.set_device(launch.local_rank)
        device = torch.device(accelerator.device_name(launch.local_rank))
    return dist.get_rank(), launch.local_rank, dist.get_world_size(), device
