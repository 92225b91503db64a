"""The run's checkpoint: one object, built once in setup from what is constant for the run, that says when
a checkpoint is due, writes a tag and reads one back.

    checkpointer = Checkpointer(engine, ema, ep, CheckpointPlan(...))
    if checkpointer.due(step):
        checkpointer.save(step, client_state)      # collective: every rank writes what it owns
    client_state = checkpointer.load(resume_point)  # collective: on the shape that wrote it or any other

The loop names no file, guard or layout: the names are `dit_moe.checkpoint.layout`'s, the free-space
check and out-of-space guard `dit_moe.train.disk`'s, the world-size-independent state
`dit_moe.train.reshard`'s. Every file of a tag (DeepSpeed's included, through its checkpoint engine's
`save`) goes through `Checkpointer._write`: one guarded atomic write, so a full disk on any rank ends in
`DiskFull` on every rank and a kill at any moment leaves the previous tag as `latest`.

Cost per rank of a save, DiT-MoE-G/2 16E2A (16.5B parameters) on 64 GPUs with ZeRO-2: this rank's part of
the resumable state (12 B/param / 64 = 3.1 GB, `reshard`; it replaces DeepSpeed's per-rank optimizer files,
which hold the same numbers for one shape only), its RNG state and, on rank 0, DeepSpeed's model file and
the EMA (gathered one tensor at a time). No rank holds more than its share of the optimizer state.
"""

from __future__ import annotations

import importlib
import random
import secrets
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist
from deepspeed.moe.utils import is_moe_param
from deepspeed.utils import groups
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..checkpoint import export as export_files
from ..checkpoint import layout, save_export
from ..checkpoint.read import DEEPSPEED_CLASSES, safe_torch_load
from ..diffusion import ObjectiveConfig
from ..models import DiTConfig
from ..parallel import ExpertParallel
from ..utils.atomic import atomic_path
from ..utils.errors import CheckpointError, UserError
from . import reshard
from .batch import BatchPlan
from .disk import CheckpointSpace, TagComposition
from .engine import EMA, expert_group_name, full_model_tensors
from .sections import RunSection


@dataclass(frozen=True)
class ResumePoint:
    """The complete tag a run resumes from and the shape that wrote it (read once, before the engine exists)."""

    tag_dir: Path
    shape: Optional[layout.RunShape]  # None: written before shape.json


def find_resume(resume: Optional[str], results_dir: Path) -> Optional[ResumePoint]:
    """The tag --resume names: `auto` is this run's own latest (none yet: a fresh start); a path may be a
    results, checkpoints or tag dir (`layout.resolve_tag_dir`) and must hold one."""
    if not resume:
        return None
    auto = resume == "auto"
    tag_dir = layout.resolve_tag_dir(results_dir / layout.CHECKPOINTS_DIR if auto else Path(resume))
    if tag_dir is None:
        if auto:
            return None
        if Path(resume).is_file():
            raise UserError(
                f"--resume {resume} is a weights file, and --resume continues a run from its checkpoint directory; "
                f"to start a new run from these weights pass --init-from {resume}."
            )
        raise FileNotFoundError(f"--resume {resume}: no complete checkpoint found there.")
    return ResumePoint(tag_dir, layout.read_shape(tag_dir))


@dataclass(frozen=True)
class CheckpointPlan:
    """What is constant for the run's checkpoints."""

    checkpoint_dir: Path
    every: int  # --ckpt-every
    keep_last: int
    elastic: bool  # also write the world-size-independent state (`reshard`): resume on any shape
    model_config: DiTConfig
    objective_config: ObjectiveConfig
    run_record: dict[str, Any]  # the VAE and EMA settings every tag and the export record (`run_record`)
    batch: BatchPlan
    device: torch.device  # where the collectives' tensors live
    export_path: Path  # the finished run's export: .safetensors (sharded above export_shard_bytes) or .pt
    export_shard_bytes: int

    @classmethod
    def for_run(
        cls,
        run: RunSection,
        batch: BatchPlan,
        model_config: DiTConfig,
        objective_config: ObjectiveConfig,
        run_record: dict[str, Any],
        device: torch.device,
    ) -> "CheckpointPlan":
        results_dir = Path(run.results_dir)
        return cls(
            results_dir / layout.CHECKPOINTS_DIR,
            run.ckpt_every,
            run.keep_last,
            run.elastic_checkpoints,
            model_config,
            objective_config,
            run_record,
            batch,
            device,
            results_dir / f"export.{run.export_format}",
            run.export_shard_bytes,
        )


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


def _shared_run_id(device: torch.device) -> str:
    """A random id drawn by rank 0 and shared with every rank: it marks every file of this run's tags."""
    token = torch.tensor([secrets.randbits(62)], dtype=torch.int64, device=device)
    dist.broadcast(token, src=0)
    return f"{int(token.item()):016x}"


class Checkpointer:
    """The run's checkpoints: `due`, `save`, `load`. Collective: every rank calls `save` and `load`."""

    def __init__(self, engine, ema: EMA, ep: Optional[ExpertParallel], plan: CheckpointPlan) -> None:
        self.engine = engine
        self.ema = ema
        self.ep = ep
        self.plan = plan
        self.rank = dist.get_rank()
        self.shape = run_shape(engine, ep, plan.batch)
        self.run_id = _shared_run_id(plan.device)
        self.composition = TagComposition.of_engine(engine, ep, plan.elastic)
        self.space: Optional[CheckpointSpace] = None  # this save's, while one runs

    def due(self, step: int) -> bool:
        return step % self.plan.every == 0

    def save(self, step: int, client_state: dict[str, Any]) -> str:
        """Write tag `stepNNNNNNN` (after a free-space check that stops every rank with `DiskFull` before
        anything is written), mark it complete, point `latest` at it and prune old tags."""
        plan = self.plan
        self.space = CheckpointSpace.for_run(
            plan.checkpoint_dir, self.composition.estimated_bytes(), plan.keep_last, plan.device
        )
        self.space.check()
        tag = layout.tag_for_step(step)
        tag_dir = plan.checkpoint_dir / tag
        if self.rank == 0 and tag_dir.exists():
            shutil.rmtree(tag_dir)  # a partial write of this step by a killed run
        dist.barrier()
        self._write_tag(tag_dir, client_state)
        self.space.agree(tag_dir)
        if self.rank == 0:
            with self.space.guard(tag_dir / layout.COMPLETE_MARKER):
                layout.mark_complete(plan.checkpoint_dir, tag, step)
        self.space.agree(tag_dir)
        if self.rank == 0:
            layout.prune(plan.checkpoint_dir, plan.keep_last)
        dist.barrier()
        self.space = None
        return tag

    def _write_tag(self, tag_dir: Path, client_state: dict[str, Any]) -> None:
        """Every file of the tag: DeepSpeed's, the resumable state, EMA, RNG, expert shard, configs, shape."""
        sharded = self.plan.elastic and self.shape.zero_stage > 0
        with self._guarded_engine_writes(), _zero_files(self.engine, written=not sharded):
            self.engine.save_checkpoint(
                str(tag_dir.parent), tag=tag_dir.name, client_state=client_state, save_latest=False
            )
        if sharded:
            reshard.save_sharded_state(self.engine, tag_dir, self.ep, self._write, self._state_meta(client_state))
        self.ema.save(self._write, tag_dir / layout.EMA_FILE)
        self._write(layout.rng_file(tag_dir, self.rank), lambda tmp: torch.save(_rng_state(), tmp))
        if self.ep is not None and groups._get_expert_data_parallel_rank(expert_group_name(self.ep.size)) == 0:
            self._write_expert_shard(tag_dir)
        if self.rank == 0:
            plan = self.plan
            text = layout.config_texts(
                plan.model_config.to_dict(), plan.objective_config.to_dict(), plan.run_record, self.shape
            )
            for name, content in text.items():
                self._write(tag_dir / name, lambda tmp, content=content: tmp.write_text(content))

    def _state_meta(self, client_state: dict[str, Any]) -> dict[str, Any]:
        return {"run_id": self.run_id, "shape": self.shape, "client": client_state}

    def _write(self, path: Path, writer: Callable[[Path], None]) -> None:
        """The one way a file of a tag is written: whole or not at all, a full disk recorded by the guard."""
        assert self.space is not None, "files of a tag are written only inside save()"
        with self.space.guard(path), atomic_path(path) as tmp:
            writer(tmp)

    @contextmanager
    def _guarded_engine_writes(self) -> Iterator[None]:
        """Route each of DeepSpeed's checkpoint file writes (`checkpoint_engine.save`) through `_write`.

        Guarding each file rather than the whole `engine.save_checkpoint` call keeps a rank whose write
        failed on DeepSpeed's path through its barriers and gathers, so the other ranks do not hang.
        """
        checkpoint_engine = self.engine.checkpoint_engine
        save = checkpoint_engine.save

        def guarded_save(state_dict, path):
            self._write(Path(path), lambda tmp: save(state_dict, str(tmp)))

        checkpoint_engine.save = guarded_save  # an instance attribute over the method, removed below
        try:
            yield
        finally:
            del checkpoint_engine.save

    def _write_expert_shard(self, tag_dir: Path) -> None:
        """This expert-parallel rank's experts (DeepSpeed's model file holds rank 0's only), written by the
        first rank of its expert-data-parallel group (the others hold the same weights)."""
        ep, module = self.ep, self.engine.module
        shard = {k: p.detach().cpu().contiguous() for k, p in module.named_parameters() if is_moe_param(p)}
        metadata = {"ep_size": str(ep.size), "ep_rank": str(ep.rank), "num_experts": str(ep.num_experts)}
        self._write(layout.expert_shard(tag_dir, ep.rank), lambda tmp: save_file(shard, str(tmp), metadata=metadata))

    def export(
        self, ema_overrides: Optional[dict[str, torch.Tensor]] = None, record: Optional[dict[str, Any]] = None
    ) -> Optional[Path]:
        """Collective: the full weights and EMA, gathered one tensor at a time to rank 0, which writes the
        export (one file, or above `export_shard_bytes` Hugging Face-style shards, each written once whole,
        so rank 0 holds at most a shard and a tensor); returns its path on rank 0. `ema_overrides` replace
        EMA entries (router thresholds calibrated for the EMA's weights); `record` (step, source tag, VAE
        and its scale) goes into the export's header."""
        path, is_writer = self.plan.export_path, self.rank == 0
        shapes = self._export_shapes()
        shards = None
        if path.suffix == ".safetensors":
            shards = export_files.plan_shards(path, shapes, self.plan.export_shard_bytes)
        tensors = self._export_tensors(ema_overrides or {})
        if shards is None:
            state = {name: tensor for name, tensor in tensors if is_writer}
            if not is_writer:
                return None
            model = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
            ema = {k[len("ema.") :]: v for k, v in state.items() if k.startswith("ema.")}
            return save_export(path, self.plan.model_config, model, ema, self.plan.objective_config, record)
        metadata = export_files.export_metadata(self.plan.model_config, self.plan.objective_config, record)
        file_of = {name: file for file, names in shards.items() for name in names}
        left = {file: len(names) for file, names in shards.items()}
        pending: dict[str, dict[str, torch.Tensor]] = {file: {} for file in shards}
        for name, tensor in tensors:
            file = file_of[name]
            left[file] -= 1
            if is_writer:
                pending[file][name] = tensor
                if not left[file]:
                    export_files.write_shard(path.parent / file, pending.pop(file), metadata)
        if not is_writer:
            return None
        total = sum(4 * int(np.prod(shape)) for shape in shapes.values())
        return export_files.write_index(path, shards, total, metadata)

    def _export_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every exported tensor's full shape, in the order `_export_tensors` yields them."""
        module = self.engine.module
        params = dict(module.named_parameters())
        model = {
            f"model.{name}": reshard.full_shape(params[name], self.ep) if name in params else tuple(value.shape)
            for name, value in module.state_dict().items()
        }
        ema = {f"ema.{name}": reshard.full_shape(param, self.ep) for name, param in params.items()}
        ema |= {f"ema.{name}": tuple(buffer.shape) for name, buffer in self.ema.buffers.items()}
        return model | ema

    def _export_tensors(self, ema_overrides: dict[str, torch.Tensor]) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, whole fp32 tensor) of the weights then the EMA, one at a time (collective; whole on rank 0)."""
        for name, tensor in full_model_tensors(self.engine, self.ep):
            yield f"model.{name}", tensor
        for name, tensor in self.ema.full_tensors(dst=0):
            yield f"ema.{name}", ema_overrides.get(name, tensor)

    def load(self, point: ResumePoint) -> dict[str, Any]:
        """Restore engine (model, optimizer, scheduler), EMA and this rank's RNG; returns the client state.

        A tag with the sharded resumable state loads it on any shape (its own included: DeepSpeed then wrote
        no optimizer files); one without loads DeepSpeed's files on its own shape (--elastic-checkpoints false)
        and, written before the sharded state, its whole-state file on another shape. Rank r of a larger world takes the RNG of rank r mod the old
        world size: the training draws do not use it (they are seeded per global micro-batch)."""
        tag_dir = point.tag_dir
        saved = point.shape or legacy_shape(tag_dir, self.shape.zero_stage)
        if layout.state_index_file(tag_dir).is_file():
            client_state = reshard.load_sharded_state(self.engine, tag_dir, self.ep)
        else:
            check_reshardable(tag_dir, saved, self.shape)
            if saved.layout == self.shape.layout:
                client_state = self._load_same_shape(tag_dir)
            else:
                client_state = reshard.load_full_state(self.engine, layout.full_state_file(tag_dir), self.ep)
        self.ema.load(tag_dir / layout.EMA_FILE)
        rng = layout.rng_file(tag_dir, self.rank % saved.world_size)
        if not rng.is_file():
            raise CheckpointError(
                f"Checkpoint {tag_dir} is missing {rng.name}: it is incomplete; resume an earlier tag."
            )
        _set_rng_state(_load_rng_state(rng))
        return client_state

    def _load_same_shape(self, tag_dir: Path) -> dict[str, Any]:
        """DeepSpeed's loader, then this expert-parallel rank's expert shard (DeepSpeed's model file holds rank 0's)."""
        with _safe_engine_loads(self.engine):
            load_path, client_state = self.engine.load_checkpoint(
                str(tag_dir.parent), tag=tag_dir.name, load_optimizer_states=True, load_lr_scheduler_states=True
            )
        if load_path is None:
            raise CheckpointError(f"DeepSpeed could not load checkpoint {tag_dir}.")
        if self.ep is not None:
            shard = load_file(str(layout.expert_shard(tag_dir, self.ep.rank)))
            with torch.no_grad():
                for name, param in self.engine.module.named_parameters():
                    if is_moe_param(param):
                        param.copy_(shard[name])
        return client_state


@contextmanager
def _safe_engine_loads(engine) -> Iterator[None]:
    """DeepSpeed's loader unpickles its files freely (weights_only=False), so a stranger's tag could run code
    on resume; inside this, each of its loads goes through torch's weights-only unpickler with only the
    DeepSpeed classes its files hold allowed, the real ones this time (`read.DEEPSPEED_CLASSES`: loss scalers,
    the ZeRO stage enum, fragment addresses: plain data, built without running code the file names)."""
    paths = (name.rsplit(".", 1) for name in DEEPSPEED_CLASSES)
    allowed = [getattr(importlib.import_module(module), attr) for module, attr in paths]
    checkpoint_engine = engine.checkpoint_engine
    checkpoint_engine.load = lambda path, map_location=None: safe_torch_load(Path(path), map_location, allowed)
    try:
        yield
    finally:
        del checkpoint_engine.load  # the instance attribute over the method


@contextmanager
def _zero_files(engine, written: bool) -> Iterator[None]:
    """DeepSpeed writes its per-rank optimizer files (`zero_pp_rank_*_optim_states.pt`) only when `written`:
    the sharded resumable state holds the same fp32 master weights and moments, and resumes any shape."""
    saves = engine.save_zero_checkpoint
    engine.save_zero_checkpoint = saves and written
    try:
        yield
    finally:
        engine.save_zero_checkpoint = saves


def run_shape(engine, ep: Optional[ExpertParallel], plan: Optional[BatchPlan] = None) -> layout.RunShape:
    """This run's shape, as `shape.json` records it."""
    batch = (plan.global_batch, plan.micro_batch, plan.grad_accum) if plan is not None else (None, None, None)
    return layout.RunShape(
        dist.get_world_size(), 1 if ep is None else ep.size, engine.zero_optimization_stage(), *batch
    )


def saved_ep_size(tag_dir: Path) -> int:
    """The --ep-size a checkpoint tag was written with (1 when it holds no expert shards)."""
    shard = layout.expert_shard(tag_dir, 0)
    if not shard.is_file():
        return 1
    with safe_open(str(shard), framework="pt") as f:
        return int(f.metadata()["ep_size"])


def legacy_shape(tag_dir: Path, zero_stage: int) -> layout.RunShape:
    """For tags older than `shape.json`, the shape its files show (the stage they cannot show is taken to be
    this run's)."""
    written_by = layout.rng_file_count(tag_dir) or dist.get_world_size()
    return layout.RunShape(written_by, saved_ep_size(tag_dir), zero_stage)


def check_reshardable(tag_dir: Path, saved: layout.RunShape, current: layout.RunShape) -> None:
    """A tag resumes on another shape only from its resumable state, and only under ZeRO-1/2/3: else one sentence."""
    if saved.layout == current.layout:
        return
    if current.zero_stage == 0 or saved.zero_stage == 0:
        raise ValueError(
            f"Checkpoint {tag_dir} was written by {saved.describe()} and this run is {current.describe()}: "
            f"resharding needs ZeRO stage 1, 2 or 3 on both sides; resume it with its own shape."
        )
    if not (layout.state_index_file(tag_dir).is_file() or layout.full_state_file(tag_dir).is_file()):
        raise ValueError(
            f"Checkpoint {tag_dir} was written by {saved.describe()} and this run is {current.describe()}, but it "
            f"holds no resumable state ({layout.STATE_INDEX_FILE}; written with --elastic-checkpoints false), "
            f"so ZeRO's optimizer shards cannot be re-split: resume it with {saved.describe()}, or start a new run "
            f"from its weights with --init-from {tag_dir} (the optimizer state restarts)."
        )
