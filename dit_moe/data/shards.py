"""On-disk format of pre-extracted latents: webdataset tar shards plus a manifest.

Each sample is keyed by its dataset index (`%09d`, never a per-rank counter) and holds
    mean.npy  float16 (2, C, H, W)  VAE posterior mean of [image, flipped image], unscaled
    std.npy   float16 (2, C, H, W)  its standard deviation
    cls       the class label
Shard i holds dataset indices [i * shard_size, (i + 1) * shard_size). A shard is written through
`dit_moe.atomic` (temporary name, renamed when complete), so a shard file that exists is whole.
`manifest.json` describes the whole set (see `Manifest`).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Tuple

import numpy as np
import webdataset as wds

from dit_moe.atomic import atomic_path, write_text

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1


def shard_name(shard: int) -> str:
    return f"shard-{shard:06d}.tar"


def sample_key(index: int) -> str:
    return f"{index:09d}"


@dataclass
class Manifest:
    """What a features folder holds; written once before any shard so every rank agrees on it."""

    num_samples: int
    shard_size: int
    latent_shape: List[int]          # (C, H, W) of one latent
    num_classes: int
    image_size: int
    vae_path: str
    vae_name: str
    scale_factor: float              # what the trainer should multiply latents by (stored unscaled)
    classes: List[str] = field(default_factory=list)
    format_version: int = FORMAT_VERSION

    @property
    def num_shards(self) -> int:
        return -(-self.num_samples // self.shard_size)

    def shard_range(self, shard: int) -> range:
        """Dataset indices stored in `shard`."""
        return range(shard * self.shard_size, min((shard + 1) * self.shard_size, self.num_samples))

    def shard_counts(self) -> np.ndarray:
        return np.array([len(self.shard_range(s)) for s in range(self.num_shards)], dtype=np.int64)

    def save(self, features_path: str) -> None:
        write_text(os.path.join(features_path, MANIFEST_NAME), json.dumps(dataclasses.asdict(self), indent=2))

    @classmethod
    def load(cls, features_path: str) -> "Manifest":
        path = os.path.join(features_path, MANIFEST_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{path!r} not found: --features-path must be a folder written by "
                f"`python -m dit_moe.data.extract` (webdataset shards + manifest.json)."
            )
        with open(path) as f:
            return cls(**json.load(f))

    def check_complete(self, features_path: str) -> List[str]:
        """Paths of all shards; raises if extraction has not finished them all."""
        paths = [os.path.join(features_path, shard_name(s)) for s in range(self.num_shards)]
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} of {len(paths)} shards in {features_path!r} are missing (e.g. {missing[0]!r}): "
                f"the extraction did not finish; run it again with the same arguments to complete it."
            )
        return paths


def write_shard(path: str, samples: Iterable[Tuple[int, np.ndarray, np.ndarray, int]]) -> int:
    """Write (index, mean (2, C, H, W), std (2, C, H, W), label) samples to the shard `path` atomically.

    Returns the number of samples written.
    """
    count = 0
    with atomic_path(path) as tmp, open(tmp, "wb") as stream:
        with wds.TarWriter(stream) as writer:
            for index, mean, std, label in samples:
                writer.write({
                    "__key__": sample_key(index),
                    "mean.npy": np.asarray(mean, dtype=np.float16),
                    "std.npy": np.asarray(std, dtype=np.float16),
                    "cls": int(label),
                })
                count += 1
    return count


def read_shard(path: str) -> Iterable[Dict[str, Any]]:
    """Raw samples of one shard, in file order: dicts of `__key__` and undecoded bytes."""
    return wds.tarfile_to_samples()([{"url": path}])


def decode_sample(raw: Dict[str, Any]) -> Tuple[int, np.ndarray, np.ndarray, int]:
    """(index, mean, std, label) from a raw shard sample."""
    mean = np.load(io.BytesIO(raw["mean.npy"]))
    std = np.load(io.BytesIO(raw["std.npy"]))
    return int(raw["__key__"]), mean, std, int(raw["cls"])
