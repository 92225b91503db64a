"""The start-up check of extracted features at cluster scale: each rank checks a share, verdicts are cached.

Rank r of W checks files r, r + W, r + 2W, ... of the folder (shards by index, fast-DiT `.npy` pairs by
number), skipping those whose cached verdict still holds (`verdicts.py`, `--check-data cached`), and the
ranks then share the outcome: if any rank found a bad file, every rank stops with that rank's sentence.
The files' contents are checked as before (`integrity.py`: headers and sizes, no array loaded).

Cost per rank, DiT-MoE-G/2 on 64 GPUs over ImageNet (1.28M samples): a first start reads 1/64 of the
headers (~20 shards of 1,000 samples, or ~40K `.npy` files); a second start on an unchanged folder stats the
same files and reads one small JSON file. Every rank still lists the folder to learn what it holds (the
loaders need that listing anyway): for fast-DiT's 2.56M `.npy` files that listing is the larger cost.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import List, Optional

import torch.distributed as dist

from dit_moe.data.integrity import DataIntegrityError
from dit_moe.data.npy_features import NpyFeatureDataset
from dit_moe.data.shards import MANIFEST_NAME, Manifest
from dit_moe.data.verdicts import VerdictCache, stamp

CHECK_MODES = ("full", "cached", "off")


@dataclass(frozen=True)
class CheckSummary:
    """What one rank's check did: files in its share, read now, skipped as unchanged, and how long it took."""

    files: int = 0
    checked: int = 0
    cached: int = 0
    seconds: float = 0.0


@dataclass
class _Share:
    """Running counts of one rank's share while it is checked."""

    cache: VerdictCache
    use_cache: bool
    files: int = 0
    checked: int = 0
    cached: int = 0

    def needs_check(self, names: List[str], paths: List[str]) -> bool:
        """Record the files' current stamps; True unless every one passed before at that stamp."""
        stamps = [stamp(path) for path in paths]
        for name, current in zip(names, stamps):
            self.cache.record(name, current)
        self.files += len(names)
        fresh = not (self.use_cache and all(self.cache.unchanged(n, s) for n, s in zip(names, stamps)))
        if fresh:
            self.checked += len(names)
        else:
            self.cached += len(names)
        return fresh


def _check_shards(features_path: str, share: _Share, rank: int, world_size: int) -> None:
    manifest = Manifest.load(features_path)
    paths = manifest.check_complete(features_path)
    for shard in range(rank, len(paths), world_size):
        if share.needs_check([os.path.basename(paths[shard])], [paths[shard]]):
            manifest.check_shard(paths[shard], shard)


def _check_npy(dataset: NpyFeatureDataset, share: _Share, rank: int, world_size: int) -> None:
    folders = [os.path.basename(dataset.features_dir), os.path.basename(dataset.labels_dir)]  # names relative
    for index in range(rank, len(dataset), world_size):
        paths = list(dataset.paths(index))
        names = [f"{folder}/{os.path.basename(path)}" for folder, path in zip(folders, paths)]
        if share.needs_check(names, paths):
            dataset.check_item(index)


def _check_share(cfg, rank: int, world_size: int) -> CheckSummary:
    began = time.perf_counter()
    use_cache = cfg.check_data == "cached"
    if cfg.dataset == "latents":
        context = f"shards {stamp(os.path.join(cfg.features_path, MANIFEST_NAME))}"
        share = _Share(VerdictCache(cfg.features_path, context, rank, world_size), use_cache)
        _check_shards(cfg.features_path, share, rank, world_size)
    else:
        dataset = NpyFeatureDataset(cfg.features_path)
        context = f"npy {dataset.reference_shape()}"
        share = _Share(VerdictCache(cfg.features_path, context, rank, world_size), use_cache)
        _check_npy(dataset, share, rank, world_size)
    share.cache.save()
    return CheckSummary(share.files, share.checked, share.cached, time.perf_counter() - began)


def _gather(message: Optional[str], world_size: int) -> List[Optional[str]]:
    """Every rank's error sentence (None: its share passed); a collective when a process group runs."""
    if world_size == 1 or not (dist.is_available() and dist.is_initialized()):
        return [message]
    messages: List[Optional[str]] = [None] * world_size
    dist.all_gather_object(messages, message)
    return messages


def check_features(cfg, rank: int = 0, world_size: int = 1) -> CheckSummary:
    """Check rank `rank`'s share of `cfg`'s extracted features (a `DataConfig`; all of them when
    `world_size` is 1), then agree: every rank raises the first bad file's sentence if any rank found one.

    `cfg.check_data`: "full" reads every file of the share, "cached" skips files unchanged since they
    passed, "off" checks nothing. Image folders and digits have no per-file check here.
    """
    if cfg.check_data == "off" or cfg.dataset not in ("latents", "npy"):
        return CheckSummary()
    summary, local = CheckSummary(), None
    try:
        summary = _check_share(cfg, rank, world_size)
    except (DataIntegrityError, OSError, ValueError) as err:  # the others must not wait for this rank forever
        local = err
    failed = next((m for m in _gather(None if local is None else str(local), world_size) if m is not None), None)
    if local is not None:
        raise local
    if failed is not None:
        raise DataIntegrityError(failed)
    return summary
