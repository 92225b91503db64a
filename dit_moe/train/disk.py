"""Disk space for checkpoints: a check before each write, and one sentence instead of a traceback
when the disk fills up anyway, with the partial tag removed and the previous checkpoint untouched.

    space = CheckpointSpace.for_run(checkpoint_dir, composition.estimated_bytes(), keep_last, device)
    space.check()                       # collective: warn below 2x the expected size, stop below 1x
    with space.guard(path):             # around each write: an out-of-space error is recorded, not raised,
        write(path)                     # so every rank still reaches the same collectives
    space.agree(tag_dir)                # collective: if any rank ran out, remove the tag and stop on all

The expected size is the previous complete checkpoint's size on disk; before the first one it is
estimated from what a tag holds (`TagComposition`: every file, over all ranks, experts counted whole).
Ranks may write to different disks (node-local storage), so the decision uses the least free space and
the largest expected size over all ranks.
"""

from __future__ import annotations

import errno
import logging
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.distributed as dist

from ..checkpoint import layout
from ..utils.errors import UserError

log = logging.getLogger("dit_moe.train")

MASTER_AND_MOMENTS = 12  # bytes per trainable parameter: fp32 master weight + Adam's two fp32 moments
EMA_BYTES = 4  # the fp32 EMA of every parameter
FILE_OVERHEAD = 64 * 1024  # headers and pickled metadata, per file
WARN_FACTOR = 2  # warn while free space is below this many checkpoints
_NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_NO_SPACE_TEXTS = ("No space left on device", "os error 28", "Disk quota exceeded")


class DiskFull(UserError):
    """The checkpoint disk cannot hold the next checkpoint; the message says where and what to do."""


def size_on_disk(tag_dir: Path) -> int:
    """Bytes the files of a checkpoint tag occupy (allocated blocks, not apparent sizes)."""
    return sum(path.stat().st_blocks * 512 for path in tag_dir.rglob("*") if path.is_file())


@dataclass(frozen=True)
class TagComposition:
    """What one checkpoint tag holds, counted over every rank's files with experts counted whole.

    The optimizer state: fp32 master + moments of the trainable parameters, 12 B/param, in the resumable state
    (`reshard`, ZeRO-1/2/3 with --elastic-checkpoints, frozen entries in fp32 too) or else in DeepSpeed's
    optimizer files (without ZeRO the model file holds the moments, 8 B/param, and fp32 masters only for
    16-bit weights). DeepSpeed's model file: the weights in their dtype, the routed experts of
    expert-parallel rank 0 only, nothing of ZeRO-3's partitioned weights. Expert shards (expert parallelism):
    every expert in the weights' dtype. The EMA: 4 B/param. For DiT-MoE-XL/2 8E2A (4.17B parameters, bf16,
    ZeRO-2, 8 GPUs) that is 4.17B x (12 + 2 + 4) = 75 GB; for G/2 16E2A (16.5B) 297 GB.
    """

    params: int  # every parameter, experts counted whole
    expert_params: int  # the routed experts' share of `params` under expert parallelism (else 0: not needed)
    frozen: int  # parameters without gradients
    weight_bytes: int  # bytes per element of the model's weights
    zero_stage: int
    ep_size: int
    world_size: int
    elastic: bool

    @classmethod
    def of_engine(cls, engine, ep, elastic: bool) -> "TagComposition":
        params = expert = frozen = 0
        for param in engine.module.parameters():
            numel = getattr(param, "ds_numel", param.numel())
            if ep is not None and getattr(param, "allreduce", True) is False:  # this rank's experts: all of them
                numel *= ep.size
                expert += numel
            params += numel
            frozen += 0 if param.requires_grad else numel
        first = next(engine.module.parameters())
        return cls(
            params,
            expert,
            frozen,
            first.element_size(),
            engine.zero_optimization_stage(),
            1 if ep is None else ep.size,
            dist.get_world_size(),
            elastic,
        )

    def estimated_bytes(self) -> int:
        trainable = self.params - self.frozen
        sharded = self.elastic and self.zero_stage > 0  # the resumable state replaces DeepSpeed's optimizer files
        if sharded:
            optimizer = MASTER_AND_MOMENTS * trainable + 4 * self.frozen
        elif self.zero_stage > 0:
            optimizer = MASTER_AND_MOMENTS * trainable
        else:
            optimizer = (8 if self.weight_bytes == 4 else MASTER_AND_MOMENTS) * trainable
        model_file = (
            0
            if self.zero_stage == 3
            else self.weight_bytes * (self.params - self.expert_params + self.expert_params // self.ep_size)
        )
        experts = self.weight_bytes * self.expert_params if self.ep_size > 1 else 0
        files = 3 * self.world_size + self.ep_size + 6
        return optimizer + model_file + experts + EMA_BYTES * self.params + FILE_OVERHEAD * files


def expected_bytes(checkpoint_dir: Path, estimate: int) -> int:
    """The previous complete checkpoint's size on disk, or `estimate` (`TagComposition`) before the first."""
    tag = layout.latest_complete_tag(checkpoint_dir)
    return size_on_disk(checkpoint_dir / tag) if tag else estimate


def free_bytes(path: Path) -> int:
    """Free bytes on the file system that holds `path`, or its nearest existing parent (not created yet)."""
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def is_out_of_space(error: BaseException) -> bool:
    """True for a write that failed for lack of space: the errno, or the text of writers that drop it
    (safetensors: "os error 28"; torch's zip writer says only "unexpected pos", see `CheckpointSpace.guard`)."""
    return getattr(error, "errno", None) in _NO_SPACE_ERRNOS or any(text in str(error) for text in _NO_SPACE_TEXTS)


def _advice(keep_last: int) -> str:
    return (
        f"free space there, point --results-dir at a larger disk, or lower --keep-last (now {keep_last}), "
        "then continue with --resume auto"
    )


@dataclass
class CheckpointSpace:
    """Free space against the expected checkpoint size, and the out-of-space failures of this rank's writes."""

    checkpoint_dir: Path
    needed: int  # expected bytes of the next checkpoint
    keep_last: int
    device: torch.device  # where the collectives' tensors live (the default group may be NCCL)
    failure: Optional[str] = field(default=None)  # the first write this rank could not finish

    @classmethod
    def for_run(cls, checkpoint_dir: Path, estimate: int, keep_last: int, device: torch.device) -> "CheckpointSpace":
        return cls(checkpoint_dir, expected_bytes(checkpoint_dir, estimate), keep_last, device)

    def _least_free_most_needed(self) -> tuple[int, int]:
        """(least free bytes, largest expected size) over all ranks (a collective)."""
        values = torch.tensor([-free_bytes(self.checkpoint_dir), self.needed], dtype=torch.int64, device=self.device)
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
        least_free, most_needed = values.tolist()  # host sync: once per checkpoint
        return -least_free, most_needed

    def check(self) -> None:
        """Collective, before a checkpoint: stop on every rank (nothing written) when the free space is below
        the expected size; rank 0 warns while it is below `WARN_FACTOR` times that."""
        free, needed = self._least_free_most_needed()
        if free < needed:
            raise DiskFull(
                f"Not enough disk space for the next checkpoint in {self.checkpoint_dir}: {free:,} bytes free, "
                f"about {needed:,} needed; {_advice(self.keep_last)}."
            )
        if free < WARN_FACTOR * needed and dist.get_rank() == 0:
            log.warning(
                "Disk space is low for checkpoints in %s: %s bytes free, about %s needed per checkpoint.",
                self.checkpoint_dir,
                f"{free:,}",
                f"{needed:,}",
            )

    @contextmanager
    def guard(self, path: Path) -> Iterator[None]:
        """Record (not raise) a write of `path` that fails for lack of space, so this rank goes on through
        the same collectives as the others; `agree` then stops every rank. A failed write that leaves less
        than a checkpoint free counts too: torch's zip writer reports a full disk only as "unexpected pos"."""
        try:
            yield
        except Exception as err:  # writers wrap a full disk in their own types (safetensors: SafetensorError)
            if not (is_out_of_space(err) or free_bytes(self.checkpoint_dir) < self.needed):
                raise
            if self.failure is None:
                self.failure = f"{path}: {' '.join(str(err).split())}"

    def agree(self, tag_dir: Path) -> None:
        """Collective: if any rank's write ran out of space, rank 0 removes the partial tag (after every rank
        stopped writing) and every rank raises `DiskFull`; the previous checkpoint and `latest` are untouched."""
        flag = torch.tensor([int(self.failure is not None)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if not flag.item():  # host sync: once per checkpoint
            return
        if self.failure is not None:
            log.error("Checkpoint write failed for lack of space: %s", self.failure)
        dist.barrier()
        if dist.get_rank() == 0:
            shutil.rmtree(tag_dir, ignore_errors=True)
        dist.barrier()
        previous = layout.latest_complete_tag(self.checkpoint_dir)
        kept = f"the previous checkpoint {self.checkpoint_dir / previous} is intact" if previous else "none earlier"
        raise DiskFull(
            f"The disk ran out of space while writing checkpoint {tag_dir} (removed; {kept}): "
            f"{free_bytes(self.checkpoint_dir):,} bytes free, about {self.needed:,} needed; {_advice(self.keep_last)}."
        )
