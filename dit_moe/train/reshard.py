"""The world-size-independent training state: resume a run on another number of processes, nodes,
--ep-size or ZeRO stage, exactly, with no rank ever holding more than its share.

`save_sharded_state`: every rank writes only the fragments its optimizer owns (`layout.state_shard`, one
safetensors file per rank): for each trainable parameter, its part of the fp32 master weight and of every
optimizer moment (Adam's `exp_avg`, `exp_avg_sq`), flat, with experts placed by their global expert
index; rank 0 adds the frozen parameters and buffers and writes the index (`layout.state_index_file`):
each file's (key, start, numel) in the coordinates of the whole flattened tensor, every tensor's global
shape, the run id that marks every file, and (JSON, so a reader needs no pickle) the optimizer step and
hyper-parameters, DeepSpeed's step counters, the learning-rate scheduler, the loss scaler and the
trainer's client state. `load_sharded_state` gives each rank of the new shape the ranges it owns there,
read by slices from the files that overlap them, and sets them through DeepSpeed's fragment API.

Why per-rank safetensors with our own index rather than torch.distributed.checkpoint: ZeRO-1/2's fragments
are flat ranges of a parameter's flattened elements that start and end anywhere (a parameter straddles the
boundary of two ranks' partitions), and ZeRO-3's are flat ranges padded at the end. DCP describes a shard
as an N-dimensional box of the tensor's shape (offsets and sizes per dimension); a flat range of a 2-D
weight is no such box unless every tensor is saved as its 1-D flattening, and building ShardedTensor or
DTensor metadata for ranges that differ per parameter needs DCP's private constructors. safetensors
slices read exactly the range asked for from a memory map, and the index is one JSON file.

Fragments come from DeepSpeed's public local API under ZeRO-3 (`safe_get_local_fp32_param`,
`safe_get_local_optimizer_state`, and their setters); under ZeRO-1/2 that API is not defined (DeepSpeed
0.19.8 asserts ZeRO-3), so they come from the per-parameter `_hp_mapping` that its own `safe_get_full_*`
functions read (listed in `dit_moe.train.engine.PRIVATE_DEEPSPEED_NAMES`).

Tags written before this format hold one whole-state file (`layout.FULL_STATE_FILE`, written by rank 0);
`load_full_state` still reads them through `safe_set_full_fp32_param` / `safe_set_full_optimizer_state`.

Why not DeepSpeed's universal checkpoints (`ds_to_universal` + `"checkpoint": {"load_universal": true}`): tried
on DeepSpeed 0.19.8, CPU, gloo, DiT-T/2 4 experts. Without expert parallelism the converter works and a ZeRO-2
tag of 2 ranks loads exactly on 1. With --ep-size 2 it fails ("shape '[2, 128, 512]' is invalid for input of
size 262144"): it concatenates every rank's partition of a parameter group, but our expert groups are
partitioned over the expert-data-parallel group and each expert-parallel rank holds other experts under the
same names (DeepSpeed issue #5716). It also needs a conversion step that writes a second copy.

Cost per rank, DiT-MoE-G/2 16E2A (16.5B parameters) on 64 GPUs: 12 B/param / 64 = 3.1 GB written and held in
host memory while saving (the same as DeepSpeed's own optimizer file); a resume on another shape reads the
same 3.1 GB plus, under ZeRO-1/2, the master weights of what the rank's model holds whole (4 B/param of its
non-expert parameters and local experts), one tensor at a time. `--elastic-checkpoints false` turns it off
(such a tag resumes on its own shape only).
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.moe.utils import is_moe_param
from deepspeed.utils import (
    safe_get_local_fp32_param,
    safe_get_local_optimizer_state,
    safe_set_full_fp32_param,
    safe_set_full_optimizer_state,
    safe_set_local_fp32_param,
    safe_set_local_optimizer_state,
)
from safetensors import safe_open

from ..checkpoint import layout
from ..checkpoint.layout import RunShape
from ..parallel import ExpertParallel
from ..utils.errors import CheckpointError
from ..utils.safetensors_stream import write_streamed

MASTER = "fp32"  # key prefix of the master weights; optimizer moments use their own state names
FROZEN = "frozen"  # parameters without gradients and buffers (floating ones in fp32)
META_KEY = "dit_moe_train_state"
HYPERPARAMETERS = ("lr", "betas", "eps", "weight_decay")  # what a config or scheduler sets per group
FORMAT_VERSION = 1  # the whole-state file of earlier tags, still read
SHARDED_VERSION = 2
Writer = Callable[[Path, Callable[[Path], None]], None]  # the checkpointer's guarded atomic write


def _base_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer inside DeepSpeed's ZeRO wrapper, stepping the flat fp32 partitions."""
    return engine.optimizer.optimizer


def _hp_params(engine) -> list[torch.Tensor]:
    """The flat fp32 partitions the optimizer steps (ZeRO-3 binds them to its param groups only while stepping)."""
    zero = engine.optimizer
    for name in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups", "fp32_groups_flat_partition"):
        if hasattr(zero, name):  # ZeRO-3, ZeRO-1/2, BF16_Optimizer (ZeRO-1 bf16 with fp32 gradient accumulation)
            return list(getattr(zero, name))
    raise RuntimeError(f"DeepSpeed's {type(zero).__name__} holds no flat fp32 partitions this trainer knows.")


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


def read_metadata(path: Path) -> dict[str, Any]:
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()[META_KEY])


def full_shape(param: torch.nn.Parameter, ep: Optional[ExpertParallel]) -> tuple[int, ...]:
    shape = tuple(getattr(param, "ds_shape", param.shape))
    if ep is not None and is_moe_param(param):
        return (ep.num_experts, *shape[1:])
    return shape


def _read(f, key: str, param: torch.nn.Parameter, ep: Optional[ExpertParallel]) -> torch.Tensor:
    """This rank's part of a saved full tensor: its own experts under expert parallelism, else all of it."""
    stored, expected = tuple(f.get_slice(key).get_shape()), full_shape(param, ep)
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
    if engine.zero_optimization_stage() in (1, 2) or hasattr(engine.optimizer, "fp32_groups_flat_partition"):
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


@dataclass(frozen=True)
class Fragment:
    """The part of one trainable parameter that this rank's optimizer steps, in the coordinates of the
    whole (all experts) parameter flattened: elements [start, start + numel)."""

    name: str
    param: torch.nn.Parameter
    global_shape: tuple[int, ...]
    start: int
    numel: int


def local_offset(param: torch.nn.Parameter, ep: Optional[ExpertParallel]) -> int:
    """Where this rank's copy of `param` starts in the whole flattened parameter: its first expert's
    offset under expert parallelism (experts lead the shape), else 0."""
    if ep is None or not is_moe_param(param):
        return 0
    return ep.first_expert * (param.numel() // ep.num_local)


def fragments(engine, ep: Optional[ExpertParallel]) -> list[Fragment]:
    """This rank's fragments: ZeRO-3's partition of each parameter (rank r holds flat elements
    [r * size, (r + 1) * size), the last one padded), or ZeRO-1/2's slice of the flat group partition that
    DeepSpeed records per parameter (`_hp_mapping.lp_fragment_address`)."""
    stage3 = engine.zero_optimization_stage() == 3
    out = []
    for name, param in _trainable(engine.module):
        if stage3:
            size = param.ds_tensor.numel()
            start = dist.get_rank(param.ds_process_group) * size
            numel = max(0, min(size, param.ds_numel - start))
        elif param._hp_mapping is not None:
            address = param._hp_mapping.lp_fragment_address
            start, numel = address.start, address.numel
        else:
            continue  # wholly in other ranks' partitions
        if numel:
            out.append(Fragment(name, param, full_shape(param, ep), local_offset(param, ep) + start, numel))
    return out


def master_view(fragment: Fragment) -> torch.Tensor:
    """The live fp32 master weights of the fragment, flat, where the optimizer keeps them (no copy under
    ZeRO-1/2 or ZeRO-3 without offload)."""
    param = fragment.param
    if hasattr(param, "ds_tensor"):
        return safe_get_local_fp32_param(param).flatten()[: fragment.numel]
    return param._hp_mapping.get_hp_fragment().flatten()


def _get(fragment: Fragment, key: str) -> torch.Tensor:
    """The fragment's master weight or moment `key`, flat, fp32, on the CPU."""
    param = fragment.param
    if hasattr(param, "ds_tensor"):
        local = safe_get_local_fp32_param(param) if key == MASTER else safe_get_local_optimizer_state(param, key)
        local = local.flatten()[: fragment.numel]
    else:
        local = param._hp_mapping.get_hp_fragment(None if key == MASTER else key).flatten()
    return local.detach().float().cpu().contiguous()


def _set(fragment: Fragment, key: str, value: torch.Tensor) -> None:
    param = fragment.param
    if hasattr(param, "ds_tensor"):
        padded = torch.zeros(param.ds_tensor.numel(), dtype=torch.float32)
        padded[: fragment.numel] = value
        padded = padded.to(param.ds_tensor.device)
        if key == MASTER:
            safe_set_local_fp32_param(param, padded)
        else:
            safe_set_local_optimizer_state(param, padded, key)
    else:
        param._hp_mapping.get_hp_fragment(None if key == MASTER else key).data.copy_(value.view(-1))


def save_sharded_state(engine, tag_dir: Path, ep: Optional[ExpertParallel], write: Writer, meta: dict) -> None:
    """Collective: every rank writes its fragments (`layout.state_shard`); rank 0 adds the frozen entries
    and the index (`layout.state_index_file`) of every rank's (key, start, numel) and the global shapes.
    `meta` holds the run id, shape and client state; `write(path, writer)` is the checkpointer's one
    guarded atomic write."""
    rank, run_id = dist.get_rank(), meta["run_id"]
    metadata = _metadata(engine, meta["client"], meta["shape"])
    if metadata["moment_keys"]:
        _link_moments(engine)
    sources: dict[str, Callable[[], torch.Tensor]] = {}  # name -> its flat tensor, fetched as it is written
    specs, entries, shapes = {}, {}, {}
    for fragment in fragments(engine, ep):
        for key in (MASTER, *metadata["moment_keys"]):
            name = f"{key}/{fragment.name}"
            sources[name] = partial(_get, fragment, key)
            specs[name] = ((fragment.numel,), torch.float32)
            entries[name], shapes[name] = (fragment.start, fragment.numel), list(fragment.global_shape)
    frozen = _frozen_state(engine.module)
    if rank == 0:
        for key, value in frozen.items():
            name = f"{FROZEN}/{key}"
            sources[name] = partial(value.flatten)
            specs[name] = ((value.numel(),), value.dtype)
            entries[name], shapes[name] = (0, value.numel()), list(value.shape)
    shard = layout.state_shard(tag_dir, rank)
    streamed = ((name, source()) for name, source in sources.items())  # one fragment in host memory at a time
    write(shard, lambda tmp: write_streamed(tmp, specs, streamed, metadata={"run_id": run_id, "rank": str(rank)}))
    del frozen, sources
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (shard.name, entries, shapes))
    if rank == 0:
        index = {"version": SHARDED_VERSION, "run_id": run_id, "meta": metadata, "shapes": {}, "files": {}}
        for name, file_entries, file_shapes in gathered:
            index["files"][name] = file_entries
            index["shapes"].update(file_shapes)
        text = json.dumps(index)
        write(layout.state_index_file(tag_dir), lambda tmp: tmp.write_text(text))


class RangeReader:
    """Reads ranges of the whole flattened tensors from the per-rank files that hold them, opening only
    the files that overlap; refuses (one sentence naming the file) a missing file or one of another run."""

    def __init__(self, tag_dir: Path, index: dict[str, Any], stack: ExitStack) -> None:
        self.tag_dir, self.index, self.stack = tag_dir, index, stack
        self.shapes = {key: tuple(shape) for key, shape in index["shapes"].items()}
        self.pieces: dict[str, list[tuple[str, int, int]]] = {}
        for file, entries in index["files"].items():
            for key, (start, numel) in entries.items():
                self.pieces.setdefault(key, []).append((file, start, numel))
        self.handles: dict[str, Any] = {}
        for file in index["files"]:
            self._check(file)

    def _check(self, file: str) -> None:
        path = self.tag_dir / file
        if not path.is_file():
            raise CheckpointError(
                f"Checkpoint {self.tag_dir} is missing {file}, one rank's part of its resumable state: the tag is "
                "incomplete; resume from an earlier tag or on the shape that wrote it."
            )
        with safe_open(str(path), framework="pt") as f:
            run_id = (f.metadata() or {}).get("run_id")
        if run_id != self.index["run_id"]:
            raise CheckpointError(
                f"{path} belongs to another run (run id {run_id}, the tag's {layout.STATE_INDEX_FILE} names "
                f"{self.index['run_id']}): restore the tag's own file, or resume from another tag."
            )

    def _open(self, file: str):
        if file not in self.handles:
            self.handles[file] = self.stack.enter_context(safe_open(str(self.tag_dir / file), framework="pt"))
        return self.handles[file]

    def read(self, key: str, start: int, numel: int) -> torch.Tensor:
        """Flat elements [start, start + numel) of the whole tensor `key`, fp32."""
        out = torch.empty(numel, dtype=torch.float32)
        covered = 0
        for file, first, count in self.pieces.get(key, ()):
            low, high = max(first, start), min(first + count, start + numel)
            if low < high:
                out[low - start : high - start] = self._open(file).get_slice(key)[low - first : high - first]
                covered += high - low
        if covered != numel:
            raise CheckpointError(
                f"Checkpoint {self.tag_dir}'s resumable state holds {covered} of the {numel} elements of {key} "
                "this rank needs: its files do not belong together; resume from another tag."
            )
        return out

    def check_shape(self, key: str, expected: tuple[int, ...]) -> None:
        if self.shapes.get(key) != expected:
            raise ValueError(
                f"The checkpoint's {key} has shape {list(self.shapes.get(key, ()))} but this model's is "
                f"{list(expected)}: the model differs from the one that wrote it; resume with the checkpoint's "
                "model flags (its dit_config.json)."
            )


def read_index(tag_dir: Path) -> dict[str, Any]:
    path = layout.state_index_file(tag_dir)
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} could not be read ({err}); resume from another tag.") from None


@torch.no_grad()
def _load_model_weights(engine, reader: RangeReader, ep: Optional[ExpertParallel]) -> None:
    """Model weights = master weights in the model's dtype, read for what this rank holds: its ZeRO-3
    partition, or (ZeRO-1/2, whose model weights are whole on every rank) the whole tensor or its experts."""
    for name, param in _trainable(engine.module):
        key = f"{MASTER}/{name}"
        if hasattr(param, "ds_tensor"):
            size = param.ds_tensor.numel()
            start = dist.get_rank(param.ds_process_group) * size
            numel = max(0, min(size, param.ds_numel - start))
            param.ds_tensor.data[:numel].copy_(reader.read(key, start, numel).to(param.dtype))
        else:
            start = local_offset(param, ep)
            param.data.copy_(reader.read(key, start, param.numel()).view(param.shape).to(param.dtype))


def _copy_frozen(reader: RangeReader, name: str, tensor: torch.Tensor) -> None:
    key = f"{FROZEN}/{name}"
    if key in reader.shapes:
        tensor.data.copy_(reader.read(key, 0, tensor.numel()).view(tensor.shape).to(tensor.dtype))


@torch.no_grad()
def _load_frozen(engine, reader: RangeReader) -> None:
    """Frozen parameters and buffers, whole from rank 0's file (collective under ZeRO-3)."""
    module = engine.module
    trainable = {name for name, _ in _trainable(module)}
    frozen = {name: p for name, p in module.named_parameters() if name not in trainable}
    writes = engine.zero_optimization_stage() != 3 or dist.get_rank() == 0  # ZeRO-3: rank 0, then re-partitioned
    with deepspeed.zero.GatheredParameters(list(frozen.values()), modifier_rank=0):
        for name, param in frozen.items() if writes else ():
            _copy_frozen(reader, name, param)
    for name, buffer in module.named_buffers():
        _copy_frozen(reader, name, buffer)


@torch.no_grad()
def load_sharded_state(engine, tag_dir: Path, ep: Optional[ExpertParallel]) -> dict[str, Any]:
    """Restore weights, master weights, optimizer moments and counters from the tag's per-rank state files
    onto this engine's partitioning, reading only the ranges this rank owns; returns the client state."""
    index = read_index(tag_dir)
    meta = index["meta"]
    keys = meta["moment_keys"]
    if keys:
        _materialize_optimizer_state(engine)
    with ExitStack() as stack:
        reader = RangeReader(tag_dir, index, stack)
        for name, param in _trainable(engine.module):
            reader.check_shape(f"{MASTER}/{name}", full_shape(param, ep))
        _load_model_weights(engine, reader, ep)
        _load_frozen(engine, reader)
        for fragment in fragments(engine, ep):
            for key in (MASTER, *keys):
                _set(fragment, key, reader.read(f"{key}/{fragment.name}", fragment.start, fragment.numel))
    _restore_counters(engine, meta)
    return meta["client"]
