"""The trainer's checkpoint directory: its names, which tag to read, and how a path names one.

This module is the one owner of the layout: the writer (`dit_moe.train.checkpointer.Checkpointer`),
the reader (`dit_moe.checkpoint.load_model` on a directory) and `--resume` all go through it.

Layout under `<results>/checkpoints/`:
    step0000100/                DeepSpeed's files (its model file; its per-rank optimizer files only with
                                --elastic-checkpoints false, else the resumable state below holds them) plus
        ema.safetensors         full fp32 EMA weights (gathered one tensor at a time, streamed by rank 0)
        dit_config.json         the model's DiTConfig, so `load_model(dir)` builds the right model
        objective_config.json   the objective's config (objective, schedule, ...), read back to sample
        rng_rankR.pt            every rank's RNG states
        experts_epR.safetensors expert parallelism only: expert-parallel rank R's local experts
        shape.json              the run's shape (processes, --ep-size, ZeRO stage, batch split): `RunShape`
        state_rankR.safetensors the world-size-independent training state (`dit_moe.train.reshard`): rank R's
                                fragments of the fp32 master weights and Adam moments, flat, by global offset
        state_index.json        which file holds which range of every tensor, their global shapes, the run id
                                that marks every state file, counters and client state
        full_state.safetensors  tags written before the sharded state: the whole state in one file (still read)
        COMPLETE                written last, after every file above is on disk
    latest                      name of the newest complete tag

Every file is written whole or not at all (`dit_moe.utils.atomic`). A tag without COMPLETE (a run
killed mid-write) is ignored by every reader, and a `latest` that is missing or names such a
tag falls back to the newest complete tag.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

from ..utils.atomic import write_text

CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest"
COMPLETE_MARKER = "COMPLETE"
CONFIG_FILE = "dit_config.json"
OBJECTIVE_CONFIG_FILE = "objective_config.json"
RUN_RECORD_FILE = "run_record.json"  # what else the run was: the VAE its latents come from and their scale
EMA_FILE = "ema.safetensors"
RNG_FILE = "rng_rank{rank}.pt"
EXPERT_SHARD = "experts_ep{rank}.safetensors"
SHAPE_FILE = "shape.json"
FULL_STATE_FILE = "full_state.safetensors"
STATE_SHARD = "state_rank{rank}.safetensors"
STATE_INDEX_FILE = "state_index.json"
TAG_PREFIX = "step"
_TAG = re.compile(rf"{TAG_PREFIX}(\d+)")


def tag_for_step(step: int) -> str:
    """The tag of the checkpoint taken after `step` optimizer steps: `step0000100`."""
    return f"{TAG_PREFIX}{step:07d}"


def is_complete(tag_dir: Path) -> bool:
    return (tag_dir / COMPLETE_MARKER).is_file()


def complete_tags(checkpoint_dir: Path) -> list[str]:
    """Tags whose write finished, oldest first (by step, so past step 9,999,999 too)."""
    if not checkpoint_dir.is_dir():
        return []
    steps = {
        int(match.group(1)): path.name
        for path in checkpoint_dir.iterdir()
        if (match := _TAG.fullmatch(path.name)) and is_complete(path)
    }
    return [steps[step] for step in sorted(steps)]


def latest_complete_tag(checkpoint_dir: Path) -> Optional[str]:
    """The tag named by `latest` if complete, else the newest complete tag (a kill mid-write)."""
    latest = checkpoint_dir / LATEST_FILE
    if latest.is_file():
        tag = latest.read_text().strip()
        if tag and is_complete(checkpoint_dir / tag):
            return tag
    tags = complete_tags(checkpoint_dir)
    return tags[-1] if tags else None


def resolve_tag_dir(path: str | os.PathLike) -> Optional[Path]:
    """The complete tag a path names: a tag dir itself, or the latest complete tag of a checkpoints
    dir or of a results dir's `checkpoints/`; None when there is none."""
    path = Path(path)
    if is_complete(path):
        return path
    for checkpoint_dir in (path, path / CHECKPOINTS_DIR):
        tag = latest_complete_tag(checkpoint_dir)
        if tag is not None:
            return checkpoint_dir / tag
    return None


def rng_file(tag_dir: Path, rank: int) -> Path:
    return tag_dir / RNG_FILE.format(rank=rank)


def rng_file_count(tag_dir: Path) -> int:
    """How many processes wrote the tag (one RNG file each)."""
    return len(list(tag_dir.glob(RNG_FILE.format(rank="*"))))


def expert_shard(tag_dir: Path, rank: int) -> Path:
    return tag_dir / EXPERT_SHARD.format(rank=rank)


def full_state_file(tag_dir: Path) -> Path:
    return tag_dir / FULL_STATE_FILE


def state_shard(tag_dir: Path, rank: int) -> Path:
    return tag_dir / STATE_SHARD.format(rank=rank)


def state_index_file(tag_dir: Path) -> Path:
    return tag_dir / STATE_INDEX_FILE


@dataclass(frozen=True)
class RunShape:
    """How the run that wrote a tag was laid out; a resume on another layout reshards (`dit_moe.train.reshard`).

    The batch fields are None for tags written before `shape.json` existed.
    """

    world_size: int
    ep_size: int
    zero_stage: int
    global_batch: Optional[int] = None
    micro_batch: Optional[int] = None
    grad_accum: Optional[int] = None

    @property
    def layout(self) -> tuple[int, int, int]:
        """What the optimizer's partitioning depends on: (processes, --ep-size, ZeRO stage)."""
        return self.world_size, self.ep_size, self.zero_stage

    def describe(self) -> str:
        return f"{self.world_size} process(es) with --ep-size {self.ep_size} under ZeRO-{self.zero_stage}"


def config_texts(
    model_config: dict[str, Any], objective_config: dict[str, Any], run_record: dict[str, Any], shape: RunShape
) -> dict[str, str]:
    """The small JSON files of a tag by name: the model and objective configs and the run's record (so the
    tag can be sampled and exported without flags), and the run's shape."""
    return {
        CONFIG_FILE: json.dumps(model_config, indent=2),
        OBJECTIVE_CONFIG_FILE: json.dumps(objective_config, indent=2),
        RUN_RECORD_FILE: json.dumps(run_record, indent=2),
        SHAPE_FILE: json.dumps(asdict(shape), indent=2),
    }


def read_shape(tag_dir: Path) -> Optional[RunShape]:
    """The tag's `RunShape`; None for tags written before it was saved."""
    fields = _read_json(tag_dir / SHAPE_FILE)
    return None if fields is None else RunShape(**fields)


def read_model_config(tag_dir: Path) -> Optional[dict[str, Any]]:
    return _read_json(tag_dir / CONFIG_FILE)


def read_objective_config(tag_dir: Path) -> Optional[dict[str, Any]]:
    """The objective config saved with the tag; None for tags written before it was saved."""
    return _read_json(tag_dir / OBJECTIVE_CONFIG_FILE)


def read_run_record(tag_dir: Path) -> dict[str, Any]:
    """The run record saved with the tag ({"vae": ...}); empty for tags written before it was saved."""
    return _read_json(tag_dir / RUN_RECORD_FILE) or {}


def _read_json(path: Path) -> Optional[dict[str, Any]]:
    return json.loads(path.read_text()) if path.is_file() else None


def mark_complete(checkpoint_dir: Path, tag: str, step: int) -> None:
    """Flush every file of the tag to disk, write COMPLETE, then point `latest` at the tag."""
    tag_dir = checkpoint_dir / tag
    for path in tag_dir.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    write_text(tag_dir / COMPLETE_MARKER, f"{step}\n")
    write_text(checkpoint_dir / LATEST_FILE, tag)


def prune(checkpoint_dir: Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` complete tags."""
    for old in complete_tags(checkpoint_dir)[:-keep_last]:
        shutil.rmtree(checkpoint_dir / old, ignore_errors=True)
