"""On-disk format of pre-extracted latents: webdataset tar shards plus a manifest.

Each sample is keyed by its dataset index (`%09d`, never a per-rank counter) and holds
    mean.npy  float16 (2, C, H, W)  VAE posterior mean of [image, flipped image], unscaled
    std.npy   float16 (2, C, H, W)  its standard deviation
    cls       the class label
Shard i holds dataset indices [i * shard_size, (i + 1) * shard_size). A shard is written through
`dit_moe.utils.atomic` (temporary name, renamed when complete), so a shard file that exists was whole when
written; copies and disks can still damage it, which `Manifest.check_shard` (tar headers and member
sizes against the manifest) and the strict reader `Manifest.shard_samples` report (see `integrity.py`).
`manifest.json` describes the whole set (see `Manifest`).
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import tarfile
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, Iterator, List, Tuple

import numpy as np
import webdataset as wds

from dit_moe.data.integrity import READ_ERRORS, DataIntegrityError
from dit_moe.utils.atomic import atomic_path, write_text

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
LATENT_DTYPE = np.float16
SAMPLE_FIELDS = ("cls", "mean.npy", "std.npy")
REEXTRACT = "delete it and run `python -m dit_moe.data.extract` again with the same arguments to re-extract it"


def shard_name(shard: int) -> str:
    return f"shard-{shard:06d}.tar"


def sample_key(index: int) -> str:
    return f"{index:09d}"


def npy_size(shape: Iterable[int], dtype) -> int:
    """Bytes of the `.npy` encoding (header + data) that the shard writer stores for an array of `shape` and `dtype`."""
    stream = io.BytesIO()
    np.lib.format.write_array(stream, np.zeros(tuple(shape), dtype=dtype))  # as webdataset's TarWriter encodes .npy
    return stream.tell()


@dataclass
class Manifest:
    """What a features folder holds; written once before any shard so every rank agrees on it."""

    num_samples: int
    shard_size: int
    latent_shape: List[int]  # (C, H, W) of one latent
    num_classes: int
    image_size: int
    vae_path: str
    vae_name: str
    scale_factor: float  # what the trainer should multiply latents by (stored unscaled)
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

    def member_sizes(self, shard: int) -> Dict[str, Tuple[int, int]]:
        """Tar member name -> (smallest, largest) size in bytes, for every file shard `shard` must hold."""
        latent = npy_size([2, *self.latent_shape], LATENT_DTYPE)
        sizes = {
            "cls": (1, len(str(max(0, self.num_classes - 1)))),
            "mean.npy": (latent, latent),
            "std.npy": (latent, latent),
        }
        return {f"{sample_key(i)}.{name}": sizes[name] for i in self.shard_range(shard) for name in SAMPLE_FIELDS}

    def check_shard(self, path: str, shard: int) -> None:
        """Raise `DataIntegrityError` unless `path` holds exactly shard `shard`'s files, each of its recorded size.

        Reads the tar headers only (one 512-byte block per member, no latent), so it is fast enough to run
        over every shard at start-up.
        """
        try:
            with tarfile.open(path, "r:") as tar:
                members = tar.getmembers()
                size = os.fstat(tar.fileobj.fileno()).st_size
        except READ_ERRORS as err:
            raise DataIntegrityError(f"Shard {path!r} is not a readable tar file ({err}); {REEXTRACT}.") from None
        expected = self.member_sizes(shard)
        for member in members:
            if member.offset_data + member.size > size:
                raise DataIntegrityError(f"Shard {path!r} is truncated inside {member.name!r}; {REEXTRACT}.")
            if member.name not in expected:
                raise DataIntegrityError(
                    f"Shard {path!r} holds {member.name!r}, which is not a file of shard {shard} or is there twice; "
                    f"{REEXTRACT}."
                )
            low, high = expected.pop(member.name)
            if not low <= member.size <= high:
                raise DataIntegrityError(
                    f"Shard {path!r} member {member.name!r} is {member.size} bytes, not the {low}..{high} its "
                    f"manifest's latent shape {self.latent_shape} implies; {REEXTRACT}."
                )
        if expected:
            raise DataIntegrityError(
                f"Shard {path!r} lacks {len(expected)} of its {len(expected) + len(members)} files "
                f"(e.g. {next(iter(expected))!r}): it is truncated; {REEXTRACT}."
            )

    def check_shards(self, features_path: str) -> List[str]:
        """Paths of all shards, each checked by `check_shard`: the start-up check of a features folder."""
        paths = self.check_complete(features_path)
        for shard, path in enumerate(paths):
            self.check_shard(path, shard)
        return paths

    def decode(self, raw: Dict[str, Any]) -> Tuple[int, np.ndarray, np.ndarray, int]:
        """`decode_sample(raw)`, raising `DataIntegrityError` unless its latents have the recorded shape."""
        index, mean, std, label = decode_sample(raw)
        shape = (2, *self.latent_shape)
        if mean.shape != shape or std.shape != shape:
            raise DataIntegrityError(
                f"Shard {raw['__url__']!r} sample {raw['__key__']!r} holds latents of shape {mean.shape} and "
                f"{std.shape}, not the manifest's {shape}; {REEXTRACT}."
            )
        return index, mean, std, label

    def shard_samples(self, path: str, shard: int) -> Iterator[Dict[str, Any]]:
        """`read_shard(path)`, raising `DataIntegrityError` unless it yields every sample of shard `shard`, whole."""
        count = 0
        try:
            for raw in read_shard(path):
                missing = [name for name in SAMPLE_FIELDS if name not in raw]
                if missing:
                    raise DataIntegrityError(f"Shard {path!r} sample {raw['__key__']!r} lacks {missing}; {REEXTRACT}.")
                count += 1
                yield raw
        except DataIntegrityError:
            raise
        except READ_ERRORS as err:
            raise DataIntegrityError(f"Shard {path!r} could not be read ({err}); {REEXTRACT}.") from None
        if count != len(self.shard_range(shard)):
            raise DataIntegrityError(
                f"Shard {path!r} holds {count} of its {len(self.shard_range(shard))} samples: it is truncated; "
                f"{REEXTRACT}."
            )


def write_shard(path: str, samples: Iterable[Tuple[int, np.ndarray, np.ndarray, int]]) -> int:
    """Write (index, mean (2, C, H, W), std (2, C, H, W), label) samples to the shard `path` atomically.

    Returns the number of samples written.
    """
    count = 0
    with atomic_path(path) as tmp, open(tmp, "wb") as stream:
        with wds.TarWriter(stream) as writer:
            for index, mean, std, label in samples:
                writer.write(
                    {
                        "__key__": sample_key(index),
                        "mean.npy": np.asarray(mean, dtype=LATENT_DTYPE),
                        "std.npy": np.asarray(std, dtype=LATENT_DTYPE),
                        "cls": int(label),
                    }
                )
                count += 1
    return count


def read_shard(path: str) -> Iterable[Dict[str, Any]]:
    """Raw samples of one shard, in file order: dicts of `__key__` and undecoded bytes."""
    return wds.tarfile_to_samples()([{"url": path}])


def decode_sample(raw: Dict[str, Any]) -> Tuple[int, np.ndarray, np.ndarray, int]:
    """(index, mean, std, label) from a raw shard sample; a damaged one raises `DataIntegrityError`."""
    try:
        mean = np.load(io.BytesIO(raw["mean.npy"]))
        std = np.load(io.BytesIO(raw["std.npy"]))
        return int(raw["__key__"]), mean, std, int(raw["cls"])
    except READ_ERRORS as err:
        raise DataIntegrityError(
            f"Shard {raw.get('__url__')!r} sample {raw.get('__key__')!r} could not be decoded ({err}); {REEXTRACT}."
        ) from None
