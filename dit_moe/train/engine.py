"""DeepSpeed's side of the run: its config for this run, engine construction, ZeRO-3 leaf modules,
expert-parallel groups, the EMA, and gathering full weights for export.

Expert parallelism (`--ep-size N`) uses DeepSpeed's own MoE machinery: its expert-parallel and
expert-data-parallel groups, expert parameters marked as its MoE layer marks them
(`allreduce = False`, `group_name`), and optimizer groups split by its helper, so ZeRO-1/2
partitions and reduces expert gradients over the expert-data-parallel group only.

Checkpoints are `dit_moe.train.checkpointer`'s (with `dit_moe.train.reshard`, its world-size-independent
state); those and this module are the ones that touch DeepSpeed.
"""

from __future__ import annotations

import atexit
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import deepspeed
import numpy as np
import torch
import torch.distributed as dist
from deepspeed.moe.layer import MoE as DeepSpeedMoE
from deepspeed.moe.utils import is_moe_param, split_params_into_different_moe_groups_for_optimizer
from deepspeed.utils import groups, set_z3_leaf_modules
from safetensors import safe_open

from ..checkpoint import layout
from ..models.moe import MoEFeedForward
from ..parallel import ExpertParallel, shard_experts
from ..utils.errors import UserError
from ..utils.host_memory import keep_freed_memory
from ..utils.launch import LaunchEnv, free_port
from ..utils.safetensors_stream import write_streamed
from . import reshard
from .batch import BatchPlan
from .deepspeed_config import load_deepspeed_config
from .sections import RunSection

EXPERT_PARALLEL_STAGES = (1, 2)
QUIET_STEPS_PER_PRINT = 10**9  # DeepSpeed prints nothing of its own: the trainer logs


TESTED_DEEPSPEED = "0.19.8"

# Every private DeepSpeed name the trainer uses: (where, name, what for). `where` is a module path, a class
# path, or "engine" / "optimizer" / "zero-1/2 parameter" / "zero-3 parameter" for attributes of the objects a
# run builds. `check_deepspeed_names` checks them at start-up, so a DeepSpeed that renamed one stops the run
# with one sentence instead of failing at the first checkpoint.
PRIVATE_DEEPSPEED_NAMES: tuple[tuple[str, str, str], ...] = (
    ("deepspeed.utils.groups", "_get_expert_parallel_group_dict", "expert-parallel groups"),
    ("deepspeed.utils.groups", "_create_expert_and_data_parallel", "expert-parallel groups"),
    ("deepspeed.utils.groups", "_get_expert_parallel_group", "expert-parallel groups"),
    ("deepspeed.utils.groups", "_get_expert_data_parallel_rank", "who writes an expert shard"),
    (
        "deepspeed.runtime.zero.stage_1_and_2.DeepSpeedZeroOptimizer",
        "_lazy_init_hp_params_optimizer_state",
        "linking optimizer moments to parameters before resharding",
    ),
    (
        "deepspeed.runtime.bf16_optimizer.BF16_Optimizer",
        "_lazy_init_hp_params_optimizer_state",
        "linking optimizer moments to parameters before resharding",
    ),
    (
        "deepspeed.runtime.zero.stage3.DeepSpeedZeroOptimizer_Stage3",
        "_set_fp32_optimizer_param_groups",
        "creating optimizer moments before resharding",
    ),
    (
        "deepspeed.runtime.zero.stage3.DeepSpeedZeroOptimizer_Stage3",
        "_clear_fp32_optimizer_param_groups",
        "creating optimizer moments before resharding",
    ),
    ("engine", "checkpoint_engine", "guarding each checkpoint file write and loading its files safely"),
    ("engine", "save_zero_checkpoint", "leaving out DeepSpeed's optimizer files when the sharded state holds them"),
    ("engine", "has_moe_layers", "checking that expert gradients are reduced over their group"),
    ("engine", "global_samples", "resharded counters"),
    ("engine", "skipped_steps", "resharded counters"),
    ("optimizer", "optimizer", "the torch optimizer inside ZeRO"),
    ("zero-1/2 parameter", "_hp_mapping", "this rank's fragment of the master weights and moments"),
    ("zero-3 parameter", "ds_tensor", "this rank's partition"),
    ("zero-3 parameter", "ds_numel", "the partitioned parameter's size"),
    ("zero-3 parameter", "ds_shape", "the partitioned parameter's shape"),
    ("zero-3 parameter", "ds_process_group", "the partition's rank"),
)


def _owner(where: str) -> Any:
    """The module or class a dotted path names (None when it does not exist)."""
    import importlib

    module_path, _, attribute = where.rpartition(".")
    try:
        return importlib.import_module(where)
    except ImportError:
        try:
            return getattr(importlib.import_module(module_path), attribute, None)
        except ImportError:
            return None


def _objects_of(engine) -> dict[str, Any]:
    """The run's objects the instance names are checked on (a parameter of the kind this stage has)."""
    if engine is None:
        return {}
    objects = {"engine": engine}
    stage = engine.zero_optimization_stage()
    if stage > 0:
        param = next(p for p in engine.module.parameters() if p.requires_grad)
        objects["zero-3 parameter" if stage == 3 else "zero-1/2 parameter"] = param
        objects["optimizer"] = engine.optimizer
    return objects


def check_deepspeed_names(engine=None) -> None:
    """Stop with one sentence when this DeepSpeed lacks a private name the trainer uses: the module and
    class ones always, the instance ones on `engine`'s objects when given."""
    objects = _objects_of(engine)
    for where, name, purpose in PRIVATE_DEEPSPEED_NAMES:
        if where in objects:
            owner = objects[where]
        elif "." in where:
            owner = _owner(where)
        else:
            continue  # an object this run does not build
        if owner is None or not hasattr(owner, name):
            raise UserError(
                f"DeepSpeed {deepspeed.__version__} has no {where}.{name}, which the trainer uses for {purpose}; "
                f"it is tested with DeepSpeed {TESTED_DEEPSPEED}: pip install deepspeed=={TESTED_DEEPSPEED}."
            )


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
    check_deepspeed_names()
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
    check_deepspeed_names(engine)
    return engine


def _is_partitioned(param: torch.nn.Parameter) -> bool:
    return hasattr(param, "ds_tensor")


def ema_decay_at(step: int, decay: float, warmup_steps: int) -> float:
    """The EMA decay of update `step` (0 for the first): during the first `warmup_steps` updates the ramp
    min(decay, (1 + step) / (10 + step)) of DiT-MoE's and TensorFlow's `num_updates` EMA, so an early EMA
    follows the weights instead of the initialisation; `decay` after. The ramp is 0.1 at the first update,
    0.9 at step 80, 0.982 at step 500 and reaches 0.9999 by step 89,991 on its own."""
    if step < warmup_steps:
        return min(decay, (1 + step) / (10 + step))
    return decay


def ema_start_share(updates: int, decay: float, warmup_steps: int) -> float:
    """The weight the starting weights still have in an EMA after `updates` updates: the product of the
    decays (with the default ramp 1 / C(n + 9, 9), below 1e-3 after 20 updates; with DiT's constant
    0.9999, 0.84 after 1,749)."""
    share = 1.0
    for step in range(updates):
        share *= ema_decay_at(step, decay, warmup_steps)
        if share < 1e-12:
            return 0.0
    return share


class EMA:
    """Exponential moving average of the fp32 master weights, kept for the fragment of each parameter that
    this rank's optimizer owns (`reshard.fragments`): 4 B/param / world per rank under ZeRO-1/2/3, no full
    copy on any GPU (DiT-MoE-XL/2 8E2A on 8 GPUs: 2.1 GB per GPU instead of 16.7 GB; G/2 16E2A on 64:
    1.0 GB). Without ZeRO (stage 0) every rank averages its whole model, as it holds it.

    Frozen parameters are not averaged and persistent buffers (router state such as a balancing bias) are
    the live module's, so a full EMA state dict loads into the model on its own. Full tensors are gathered
    one at a time (`full_tensors`): each rank adds its fragment into one zero tensor of the parameter's size
    and a reduction sums them (the fragments are disjoint and cover the parameter).
    """

    def __init__(self, engine, decay: float, ep: Optional[ExpertParallel] = None, warmup_steps: int = 0):
        self.engine = engine
        self.decay = decay
        self.warmup_steps = warmup_steps
        self.ep = ep  # expert parallelism: expert fragments sit at their global expert offsets
        module = engine.module
        self.params = dict(module.named_parameters())
        persistent = module.state_dict().keys()
        self.buffers = {name: b for name, b in module.named_buffers() if name in persistent}
        self.sharded = engine.zero_optimization_stage() > 0
        if self.sharded:
            self.fragments = {f.name: f for f in reshard.fragments(engine, ep)}
            self.shadow = {name: reshard.master_view(f).float().clone() for name, f in self.fragments.items()}
        else:
            self.fragments = {}
            self.shadow = {name: p.detach().float().clone() for name, p in self.params.items() if p.requires_grad}

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Average in the weights after optimizer step `step` (0 for the first)."""
        weight = 1.0 - ema_decay_at(step, self.decay, self.warmup_steps)
        for name, shadow in self.shadow.items():
            live = reshard.master_view(self.fragments[name]) if self.sharded else self.params[name]
            shadow.lerp_(live.float(), weight)

    def _whole(self, name: str, dst: Optional[int]) -> torch.Tensor:
        """The whole fp32 EMA of trainable parameter `name` (collective), on the CPU."""
        param = self.params[name]
        if not self.sharded:
            local = self.shadow[name]
            return (self.ep.gather_experts(local) if self.ep is not None and is_moe_param(param) else local).cpu()
        shape = reshard.full_shape(param, self.ep)
        whole = torch.zeros(int(np.prod(shape)), dtype=torch.float32, device=param.device)
        if name in self.fragments:
            fragment = self.fragments[name]
            whole[fragment.start : fragment.start + fragment.numel] = self.shadow[name]
        if dst is None:
            dist.all_reduce(whole)
        else:
            dist.reduce(whole, dst=dst)
        return whole.view(shape).cpu()

    @torch.no_grad()
    def live_shaped(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, the EMA of trainable parameter `name` shaped as this rank's live parameter: under expert
        parallelism its own experts) one at a time (collective: every rank iterates it all)."""
        for name, param in self.params.items():
            if param.requires_grad:
                whole = self._whole(name, None)
                yield name, (self.ep.local_slice(whole) if self.ep is not None and is_moe_param(param) else whole)

    @torch.no_grad()
    def full_tensors(self, dst: Optional[int] = None) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, whole fp32 EMA tensor) one at a time: trainable parameters averaged, frozen ones and the
        persistent buffers live (collective: every rank iterates it all; with `dst` only that rank's values
        are whole)."""
        for name, param in self.params.items():
            if param.requires_grad:
                yield name, self._whole(name, dst)
            else:
                with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                    yield name, param.detach().float().cpu().clone()
        for name, buffer in self.buffers.items():
            yield name, buffer.detach().float().cpu().clone()

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole fp32 EMA with the live persistent buffers, on every rank (collective)."""
        return dict(self.full_tensors())

    def specs(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """(full shape, dtype) of every tensor `full_tensors` yields, in its order."""
        specs = {name: (reshard.full_shape(p, self.ep), torch.float32) for name, p in self.params.items()}
        return specs | {name: (tuple(b.shape), torch.float32) for name, b in self.buffers.items()}

    def save(self, write: Callable[[Path, Callable[[Path], None]], None], path: Path) -> None:
        """Collective: the EMA gathered one tensor at a time to rank 0, which streams each into `path` through
        `write` (the checkpointer's guarded atomic write): no rank holds more than one whole tensor."""
        tensors = self.full_tensors(dst=0)
        if dist.get_rank() == 0:
            write(path, lambda tmp: write_streamed(tmp, self.specs(), tensors))
        else:
            for _ in tensors:  # join every gather
                pass

    @torch.no_grad()
    def load(self, path: Path) -> None:
        """Read back this rank's fragments (or, without ZeRO, its whole tensors) from an EMA file of the full
        tensors: only the rows that hold them."""
        with safe_open(str(path), framework="pt") as f:
            for name, shadow in self.shadow.items():
                param = self.params[name]
                if self.sharded:
                    fragment = self.fragments[name]
                    shadow.copy_(read_flat_range(f, name, fragment.start, fragment.numel))
                else:
                    start = reshard.local_offset(param, self.ep)
                    shadow.copy_(read_flat_range(f, name, start, param.numel()).view(param.shape))


def read_flat_range(f, key: str, start: int, numel: int) -> torch.Tensor:
    """Flat elements [start, start + numel) of tensor `key` of an open safetensors file, read as the whole
    rows (along the first dimension) that hold them."""
    piece = f.get_slice(key)
    shape = piece.get_shape()
    if not shape:
        return f.get_tensor(key).reshape(1)[start : start + numel]
    row = int(np.prod(shape[1:]))
    first, last = start // row, -(-(start + numel) // row)
    rows = piece[first:last].reshape(-1)
    return rows[start - first * row : start - first * row + numel].float()


def full_model_tensors(engine, ep: Optional[ExpertParallel] = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, whole fp32 weight on the CPU) of the engine's module, one tensor at a time (collective under
    ZeRO-3 or expert parallelism: every rank iterates it all)."""
    module = engine.module
    params = dict(module.named_parameters())
    for name, value in module.state_dict().items():
        param = params.get(name)
        if param is not None and _is_partitioned(param):
            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                yield name, param.detach().float().cpu().clone()
        elif param is not None and ep is not None and is_moe_param(param):
            yield name, ep.gather_experts(param.detach()).float().cpu()
        else:
            yield name, value.detach().float().cpu().clone()


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


CPU_COMM_OP = "deepspeed_shm_comm"  # DeepSpeed's CPU all-reduce op, compiled by torch on its first use


def cpu_op_cache() -> Path:
    """Where torch keeps DeepSpeed's compiled CPU communication op (TORCH_EXTENSIONS_DIR, else its cache)."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "torch_extensions"
    )
    return Path(root) / f"py{sys.version_info.major}{sys.version_info.minor}_cpu" / CPU_COMM_OP / f"{CPU_COMM_OP}.so"


def say_if_cpu_op_builds() -> None:
    """DeepSpeed compiles its CPU communication op on first use with no output of its own: say so first."""
    if not cpu_op_cache().is_file():
        print(
            f"Building DeepSpeed's CPU communication op once (a C++ compile, 1-3 minutes on 2 cores; cached in "
            f"{cpu_op_cache().parent} afterwards)...",
            file=sys.stderr,
            flush=True,
        )


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
    if accelerator.device_name() == "cpu" and launch.local_rank == 0:
        say_if_cpu_op_builds()
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    if accelerator.device_name() == "cpu":
        _unlink_shm_buffer_at_exit(dist.get_rank())
        keep_freed_memory()
        device = torch.device("cpu")
    else:
        accelerator.set_device(launch.local_rank)
        device = torch.device(accelerator.device_name(launch.local_rank))
    return dist.get_rank(), launch.local_rank, dist.get_world_size(), device
