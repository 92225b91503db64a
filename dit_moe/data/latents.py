"""Streaming reader of latent shards (see `shards.py`), split by rank and dataloader worker.

Every epoch the shard list is permuted with (seed, epoch), and shard j of that order goes
to slot j % (world_size * num_workers), slot = rank * num_workers + worker: across the
cluster each sample is read once per epoch. Within a slot, samples pass a seeded shuffle
buffer; which of the stored [plain, flipped] latents is used and the posterior noise
come from a generator seeded by (seed, epoch, dataset index), so the stream is a pure
function of (seed, rank, world size, workers).

Workers batch their own samples and the DataLoader takes batches round-robin (batch b
from worker b % workers), so resuming after `b` batches is exact: the workers' roles are
rotated so the round-robin order continues, and each skips its share, whole epochs by arithmetic on the manifest's shard sizes and the rest of the
current epoch by reading (not decoding) raw samples.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from dit_moe.data.shards import Manifest


def check_enough_shards(num_shards: int, world_size: int, num_workers: int, features_path: str) -> None:
    """Shard-level splitting needs a shard for every (rank, worker) slot."""
    slots = world_size * max(1, num_workers)
    if num_shards < slots:
        raise ValueError(
            f"{features_path!r} has {num_shards} shards but {world_size} rank(s) x {max(1, num_workers)} worker(s) "
            f"need at least {slots}; re-extract with a smaller --shard-size or use fewer data workers."
        )


def worker_batches_before(batches: int, worker: int, num_workers: int) -> int:
    """How many of the first `batches` round-robin batches came from `worker`."""
    return max(0, -(-(batches - worker) // num_workers))


@dataclass(frozen=True)
class LatentView:
    """How a stored (mean, std) pair becomes a training latent."""

    random_flip: bool = True  # horizontal flip of half the samples (the flipped view's stored moments)
    sample_latents: bool = True  # draw mean + std * eps; False: the mean
    scale_factor: float = 0.18215  # latents are multiplied by it (the manifest's VAE scale)


class LatentShardStream(IterableDataset):
    """Infinite (or `num_epochs`-long) stream of (latent (C, H, W) float32 scaled, label, dataset index).

    Set `start_batch` and `batch_size` before iterating to resume after that many
    batches of the DataLoader that wraps this stream.
    """

    def __init__(
        self,
        features_path: str,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        view: LatentView = LatentView(),
        num_epochs: Optional[int] = None,
    ):
        self.manifest = Manifest.load(features_path)
        self.paths = self.manifest.check_complete(features_path)
        self.counts = self.manifest.shard_counts()
        self.features_path = features_path
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle_buffer = max(1, shuffle_buffer)
        self.view = view
        self.num_epochs = num_epochs
        self.start_batch, self.batch_size = 0, 1
        self._slot_counts: Dict[Tuple[int, int, int], int] = {}

    # --- which shards a slot reads -------------------------------------------------
    def slot_shards(self, epoch: int, slot: int, slots: int) -> np.ndarray:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.paths))
        return order[slot::slots]

    def slot_count(self, epoch: int, slot: int, slots: int) -> int:
        """Samples a slot reads in `epoch` (memoised: resuming walks every epoch so far)."""
        key = (epoch, slot, slots)
        if key not in self._slot_counts:
            self._slot_counts[key] = int(self.counts[self.slot_shards(*key)].sum())
        return self._slot_counts[key]

    def epoch_after(self, samples: int, slot: int, slots: int) -> Tuple[int, int]:
        """(epoch, samples into it) of a slot that has produced `samples` samples."""
        epoch = 0
        while samples >= self.slot_count(epoch, slot, slots):
            samples -= self.slot_count(epoch, slot, slots)
            epoch += 1
        return epoch, samples

    # --- iteration -------------------------------------------------------------------
    def _raw_epoch(self, epoch: int, slot: int, slots: int) -> Iterator[dict]:
        """This slot's raw samples of `epoch`, after the shuffle buffer."""
        rng = np.random.default_rng([self.seed, epoch, slot, slots])
        raw = itertools.chain.from_iterable(
            self.manifest.shard_samples(self.paths[s], s) for s in self.slot_shards(epoch, slot, slots)
        )
        buffer: List[dict] = []
        for sample in raw:
            if len(buffer) < self.shuffle_buffer:
                buffer.append(sample)
                continue
            j = int(rng.integers(len(buffer)))
            yield buffer[j]
            buffer[j] = sample
        for j in rng.permutation(len(buffer)):
            yield buffer[j]

    def _decode(self, raw: dict, epoch: int) -> Tuple[torch.Tensor, int, int]:
        index, mean, std, label = self.manifest.decode(raw)
        rng = np.random.default_rng([self.seed, epoch, index])
        view = int(self.view.random_flip and rng.random() < 0.5)  # 0: plain, 1: flipped
        latent = mean[view].astype(np.float32)
        if self.view.sample_latents:
            latent = latent + std[view].astype(np.float32) * rng.standard_normal(latent.shape, dtype=np.float32)
        return torch.from_numpy(latent * np.float32(self.view.scale_factor)), label, index

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, int, int]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        # A fresh DataLoader asks worker 0 first, but batch `start_batch` belongs to worker
        # start_batch % num_workers: rotate the roles so the round-robin order continues.
        worker = (worker + self.start_batch) % num_workers
        check_enough_shards(len(self.paths), self.world_size, num_workers, self.features_path)
        slot, slots = self.rank * num_workers + worker, self.world_size * num_workers
        skip = worker_batches_before(self.start_batch, worker, num_workers) * self.batch_size
        epoch, skip = self.epoch_after(skip, slot, slots)
        epochs = itertools.count(epoch) if self.num_epochs is None else range(epoch, self.num_epochs)
        for epoch in epochs:
            for raw in itertools.islice(self._raw_epoch(epoch, slot, slots), skip, None):
                yield self._decode(raw, epoch)
            skip = 0
