"""The trainer's one entry to data: `build_train_loader(cfg, rank, world_size, micro_batch_size, seed, global_batch)`.

A `TrainLoader` is an infinite iterator of (x, y) micro-batches for one rank: x float
(N, C, H, W) -- images in [-1, 1] for digits/folder (scaled latents once the trainer has
run `codec.encode` when `needs_encoding`), scaled latents for latents/npy -- and y long (N,).
Its `state_dict()` is its position; a loader given it by `load_state_dict` yields exactly
the batches an uninterrupted one would have yielded next. For map-style datasets the position is
in global samples, so a loader of another world size (same global batch) continues the epoch
with no sample repeated or skipped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Iterator, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from dit_moe.data.config import DataConfig
from dit_moe.data.digits import NUM_DIGIT_CLASSES, DigitsDataset
from dit_moe.data.folder import ImageFolderDataset
from dit_moe.data.integrity import DataIntegrityError, without_worker_traceback
from dit_moe.data.latents import LatentShardStream, LatentView, check_enough_shards, worker_batches_before
from dit_moe.data.npy_features import NpyFeatureDataset
from dit_moe.data.shards import Manifest
from dit_moe.data.vae import load_codec, vae_geometry

Batch = Tuple[torch.Tensor, torch.Tensor]


@dataclass
class DataInfo:
    """What the model must be built for, and whether batches still need the VAE."""

    input_channels: int
    input_size: int
    num_classes: int
    needs_encoding: bool
    num_samples: int


def build_codec(cfg: DataConfig):
    """The codec matching `cfg`: encodes folder images on the fly, decodes samples for every dataset."""
    return load_codec(cfg.vae_path, cfg.vae_scale_factor, cfg.channels)


def _image_geometry(cfg: DataConfig) -> Tuple[int, int]:
    """(channels, size) of the model input for image datasets: pixels, or the VAE's latents."""
    if cfg.pixel_space:
        return cfg.channels, cfg.image_size
    channels, downsample = vae_geometry(cfg.vae_path)
    if cfg.image_size % downsample:
        raise ValueError(
            f"Image size {cfg.image_size} is not divisible by the VAE's downsampling factor {downsample}; "
            f"choose a multiple of {downsample}."
        )
    return channels, cfg.image_size // downsample


def _num_classes(cfg: DataConfig, found: int) -> int:
    if cfg.num_classes is None:
        return found
    if cfg.num_classes < found:
        raise ValueError(f"num_classes={cfg.num_classes} but the data has {found} classes; raise --num-classes.")
    return cfg.num_classes


class TrainLoader:
    """Infinite iterator of (x, y) micro-batches for one rank, with a resumable position."""

    def __init__(self, info: DataInfo):
        self.info = info

    def check_resumable_on(self, world_size: int) -> None:
        """Stop with one sentence when a position saved by `world_size` processes cannot continue here;
        positions in global samples (map-style datasets) continue on any number of processes."""

    @property
    def input_channels(self) -> int:
        return self.info.input_channels

    @property
    def input_size(self) -> int:
        return self.info.input_size

    @property
    def num_classes(self) -> int:
        return self.info.num_classes

    @property
    def needs_encoding(self) -> bool:
        return self.info.needs_encoding

    def __iter__(self) -> "TrainLoader":
        return self

    @staticmethod
    def _next_of(batches: Iterator):
        """`next(batches)` of a DataLoader iterator; a damaged file a worker hit surfaces as its one sentence."""
        try:
            return next(batches)
        except DataIntegrityError as err:
            raise without_worker_traceback(err) from None

    def _check_state(self, state: Dict[str, Any], keys) -> None:
        ours = self.state_dict()
        differ = [f"{k}={state.get(k)!r} (now {ours[k]!r})" for k in keys if state.get(k) != ours[k]]
        if differ:
            raise ValueError(
                f"Data loader state was saved with {', '.join(differ)}; resume with the same settings "
                f"to continue the same batch sequence."
            )


class MapTrainLoader(TrainLoader):
    """Map-style datasets: a (seed, epoch) permutation dealt by global position; position = (epoch, samples).

    An epoch is the first whole global batches of the permutation (the tail short of one is dropped),
    cut into global micro-batches of world_size x micro_batch_size samples; rank r takes positions
    r, r + W, r + 2W, ... of each, as `RankSlice` slices the draws. Neither the epoch nor the order
    of its samples depends on how the global batch is split, only where each sample is computed.
    """

    def __init__(
        self,
        dataset: Dataset,
        info: DataInfo,
        rank: int,
        world_size: int,
        micro_batch_size: int,
        seed: int,
        num_workers: int = 0,
        global_batch: Optional[int] = None,
    ):
        super().__init__(info)
        self.dataset, self.rank, self.world_size = dataset, rank, world_size
        self.micro_batch_size, self.seed, self.num_workers = micro_batch_size, seed, num_workers
        self.global_micro_batch = world_size * micro_batch_size
        self.global_batch = global_batch or self.global_micro_batch
        if self.global_batch % self.global_micro_batch:
            raise ValueError(
                f"Global batch {self.global_batch} is not a whole number of micro-batches of {world_size} rank(s) x "
                f"{micro_batch_size}."
            )
        self.samples_per_epoch = len(dataset) // self.global_batch * self.global_batch
        self.batches_per_epoch = self.samples_per_epoch // self.global_micro_batch
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"The dataset has {len(dataset)} samples, fewer than one global batch of {self.global_batch}; "
                f"use a smaller batch size or more data."
            )
        self.epoch, self.batch = 0, 0
        self._batches: Optional[Iterator[Batch]] = None

    def epoch_batches(self, epoch: int) -> np.ndarray:
        """(batches_per_epoch, micro_batch_size) dataset indices of this rank in `epoch`."""
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.dataset))
        mine = order[: self.samples_per_epoch][self.rank :: self.world_size]
        return mine.reshape(self.batches_per_epoch, self.micro_batch_size)

    def _start_epoch(self) -> Iterator[Batch]:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(self.epoch)
        batches = self.epoch_batches(self.epoch)[self.batch :].tolist()
        return iter(DataLoader(self.dataset, batch_sampler=batches, num_workers=self.num_workers))

    def __next__(self) -> Batch:
        while True:
            if self._batches is None:
                self._batches = self._start_epoch()
            try:
                x, y = self._next_of(self._batches)
            except StopIteration:
                self.epoch, self.batch, self._batches = self.epoch + 1, 0, None
                continue
            self.batch += 1
            return x, y.long()

    def state_dict(self) -> Dict[str, Any]:
        """The position in global samples of the epoch: the same for every rank and world size."""
        return {
            "kind": "map",
            "epoch": self.epoch,
            "samples": self.batch * self.global_micro_batch,
            "seed": self.seed,
            "global_batch": self.global_batch,
            "num_samples": len(self.dataset),
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if "samples" not in state:  # saved before positions were global: per-rank batches, one micro-step a step
            state = {**state, "samples": state["batch"] * state["micro_batch_size"] * state["world_size"]}
            state["global_batch"] = state["micro_batch_size"] * state["world_size"]
        self._check_state(state, ("kind", "seed", "global_batch", "num_samples"))
        if state["samples"] % self.global_micro_batch:
            raise ValueError(
                f"The data position ({state['samples']} samples into epoch {state['epoch']}) is not a whole number "
                f"of micro-batches of {self.world_size} rank(s) x {self.micro_batch_size}; resume with a micro "
                f"batch that divides it."
            )
        self.epoch, self.batch, self._batches = state["epoch"], state["samples"] // self.global_micro_batch, None


class ShardTrainLoader(TrainLoader):
    """Latent shards streamed by `LatentShardStream`; position = batches consumed (exact resume)."""

    def __init__(self, stream: LatentShardStream, info: DataInfo, micro_batch_size: int, num_workers: int):
        super().__init__(info)
        check_enough_shards(len(stream.paths), stream.world_size, num_workers, stream.features_path)
        self.stream, self.micro_batch_size, self.num_workers = stream, micro_batch_size, num_workers
        self.batches = 0
        self._batches: Optional[Iterator] = None

    @property
    def epoch(self) -> int:
        """The oldest epoch any of this rank's workers is still in."""
        workers = max(1, self.num_workers)
        slots = self.stream.world_size * workers
        return min(
            self.stream.epoch_after(
                worker_batches_before(self.batches, w, workers) * self.micro_batch_size,
                self.stream.rank * workers + w,
                slots,
            )[0]
            for w in range(workers)
        )

    def __next__(self) -> Batch:
        if self._batches is None:
            self.stream.start_batch, self.stream.batch_size = self.batches, self.micro_batch_size
            self._batches = iter(
                DataLoader(self.stream, batch_size=self.micro_batch_size, num_workers=self.num_workers)
            )
        x, y, _ = self._next_of(self._batches)
        self.batches += 1
        return x, y.long()

    def state_dict(self) -> Dict[str, Any]:
        return {
            "kind": "shards",
            "batches": self.batches,
            "seed": self.stream.seed,
            "world_size": self.stream.world_size,
            "micro_batch_size": self.micro_batch_size,
            "num_workers": self.num_workers,
            "num_samples": self.stream.manifest.num_samples,
        }

    def check_resumable_on(self, world_size: int) -> None:
        if world_size != self.stream.world_size:
            raise ValueError(
                f"Latent shards are dealt whole to each process's workers, so their sample order depends on the "
                f"number of processes ({world_size} when saved, {self.stream.world_size} now): resume on {world_size} "
                f"processes, or train from .npy features (--dataset npy), whose position is in global samples."
            )

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.check_resumable_on(state["world_size"])
        self._check_state(state, ("kind", "seed", "micro_batch_size", "num_workers", "num_samples"))
        self.batches, self._batches = state["batches"], None


def build_train_loader(
    cfg: DataConfig, rank: int, world_size: int, micro_batch_size: int, seed: int, global_batch: Optional[int] = None
) -> TrainLoader:
    """The `TrainLoader` for `cfg` on `rank` of `world_size`, yielding `micro_batch_size` samples per batch;
    `global_batch` (samples per optimizer step; default one micro-batch per rank) sets where epochs end."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}.")
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be positive, got {micro_batch_size}.")
    if cfg.dataset == "latents":
        manifest = Manifest.load(cfg.features_path)
        stream = LatentShardStream(
            cfg.features_path,
            rank,
            world_size,
            seed,
            cfg.shuffle_buffer,
            LatentView(cfg.random_flip, cfg.sample_latents, manifest.scale_factor),
        )
        if manifest.image_size != cfg.image_size:
            raise ValueError(
                f"{cfg.features_path!r} was extracted at image size {manifest.image_size}, not {cfg.image_size}; "
                f"pass --image-size {manifest.image_size}."
            )
        channels, size, _ = manifest.latent_shape
        info = DataInfo(channels, size, _num_classes(cfg, manifest.num_classes), False, manifest.num_samples)
        return ShardTrainLoader(stream, info, micro_batch_size, cfg.num_workers)

    num_workers = cfg.num_workers
    if cfg.dataset == "digits":
        dataset, num_workers = DigitsDataset("all", cfg.image_size, cfg.channels), 0
        channels, size = _image_geometry(cfg)
        info = DataInfo(channels, size, _num_classes(cfg, NUM_DIGIT_CLASSES), cfg.needs_encoding, len(dataset))
    elif cfg.dataset == "folder":
        dataset = ImageFolderDataset(cfg.data_path, cfg.image_size, cfg.random_flip, seed)
        channels, size = _image_geometry(cfg)
        info = DataInfo(channels, size, _num_classes(cfg, dataset.num_classes), cfg.needs_encoding, len(dataset))
    else:
        dataset = NpyFeatureDataset(cfg.features_path)
        channels, size, _ = dataset.latent_shape
        info = DataInfo(channels, size, cfg.num_classes, False, len(dataset))
    return MapTrainLoader(dataset, info, rank, world_size, micro_batch_size, seed, num_workers, global_batch)
