"""Sample batches in the ADM evaluator's `.npz` format, written atomically.

The convention (openai/guided-diffusion `scripts/image_sample.py` writes it with
`np.savez(path, arr, label_arr)`, `evaluations/evaluator.py` reads it):

    arr_0   uint8 (N, H, W, 3), NHWC RGB in [0, 255]   -- the images; the evaluator streams it
    arr_1   int64 (N,)                                  -- class labels, present for conditional samples

Reference batches may instead (or also) carry precomputed Inception statistics
`mu` (D,) and `sigma` (D, D); `read_npz` hands those back too. The archive is
uncompressed (`np.savez`), which the evaluator's streaming reader handles.
"""

from __future__ import annotations

import math
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..utils.atomic import atomic_path
from ..utils.npy_header import read_npy_header

IMAGES_KEY = "arr_0"
LABELS_KEY = "arr_1"
MU_KEY = "mu"
SIGMA_KEY = "sigma"


@dataclass
class NpzBatch:
    """What an ADM-style `.npz` holds: images and labels, and/or precomputed feature statistics."""

    images: Optional[np.ndarray]  # uint8 (N, H, W, 3); None when absent or not loaded
    labels: Optional[np.ndarray]  # int64 (N,)
    mu: Optional[np.ndarray] = None  # (D,)
    sigma: Optional[np.ndarray] = None  # (D, D)
    num_images: int = 0  # N, known without loading the images


def to_uint8_nhwc(images: np.ndarray | torch.Tensor) -> np.ndarray:
    """Images as uint8 NHWC: float (N, C, H, W) in [-1, 1] are mapped as DiT does
    (`clamp(127.5 * x + 128, 0, 255)`), uint8 input must already be NHWC and is returned as is."""
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    if images.ndim != 4:
        raise ValueError(f"Expected a batch of images with 4 dimensions, got shape {images.shape}.")
    if images.dtype == np.uint8:
        if images.shape[-1] not in (1, 3):
            raise ValueError(f"uint8 images must be NHWC with 1 or 3 channels, got shape {images.shape}.")
        return images
    if images.shape[1] not in (1, 3):
        raise ValueError(f"Float images must be NCHW with 1 or 3 channels in [-1, 1], got shape {images.shape}.")
    pixels = np.clip(127.5 * images.astype(np.float32) + 128.0, 0, 255).astype(np.uint8)
    return pixels.transpose(0, 2, 3, 1)  # (N, C, H, W) -> (N, H, W, C)


def to_rgb(images: np.ndarray) -> np.ndarray:
    """uint8 NHWC with grey (1-channel) images replicated to 3 channels, as the evaluator expects RGB."""
    return np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images


def write_npz(path: str | os.PathLike, images: np.ndarray | torch.Tensor, labels: Optional[np.ndarray] = None) -> Path:
    """Write images (uint8 NHWC, or float NCHW in [-1, 1]) and optional labels as `arr_0` / `arr_1`.

    The file appears complete or not at all (`dit_moe.utils.atomic`).
    """
    path = Path(path)
    if path.suffix != ".npz":
        raise ValueError(f"Sample batches are .npz files; {path} has another extension.")
    arrays = {IMAGES_KEY: np.ascontiguousarray(to_rgb(to_uint8_nhwc(images)))}
    if labels is not None:
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        if len(labels) != len(arrays[IMAGES_KEY]):
            raise ValueError(f"{len(labels)} labels for {len(arrays[IMAGES_KEY])} images; pass one label per image.")
        arrays[LABELS_KEY] = labels
    with atomic_path(path) as tmp:
        np.savez(tmp, **arrays)
    return path


def write_statistics(path: str | os.PathLike, mu: np.ndarray, sigma: np.ndarray) -> Path:
    """Write reference feature statistics (`mu`, `sigma`) in the evaluator's key names, atomically."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: np.savez adds no .npz suffix
        np.savez(f, **{MU_KEY: mu, SIGMA_KEY: sigma})
    return path


def read_npz(path: str | os.PathLike, load_images: bool = True) -> NpzBatch:
    """Read a sample or reference batch; labels may also be stored under "labels".

    With `load_images=False` only labels, statistics and the image count are read
    (stream the images with `iter_npz_images`: 50,000 256x256 samples are 10 GB).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist; pass an .npz written by dit_moe.sampling.many or the ADM tools."
        )
    with np.load(path) as data:
        keys = set(data.files)
        label_key = LABELS_KEY if LABELS_KEY in keys else "labels" if "labels" in keys else None
        labels = data[label_key].astype(np.int64) if label_key else None
        mu = data[MU_KEY] if MU_KEY in keys else None
        sigma = data[SIGMA_KEY] if SIGMA_KEY in keys else None
    if IMAGES_KEY not in keys and mu is None:
        raise ValueError(
            f"{path} holds neither images ({IMAGES_KEY}) nor statistics ({MU_KEY}/{SIGMA_KEY}); keys: {sorted(keys)}."
        )
    images, num_images = None, 0
    if IMAGES_KEY in keys:
        shape, dtype = _images_header(path)
        num_images = shape[0]
        if load_images:
            images = next(iter_npz_images(path, num_images)) if num_images else np.zeros(shape, dtype)
    return NpzBatch(images=images, labels=labels, mu=mu, sigma=sigma, num_images=num_images)


def _images_header(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    with zipfile.ZipFile(path) as zf, zf.open(f"{IMAGES_KEY}.npy") as arr_f:
        shape, fortran, dtype = read_npy_header(arr_f)
    if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3 or fortran:
        raise ValueError(f"{path}: {IMAGES_KEY} must be a C-ordered uint8 (N, H, W, 3) array, got {dtype} {shape}.")
    return shape, dtype


def iter_npz_images(path: str | os.PathLike, batch_size: int) -> Iterator[np.ndarray]:
    """Stream `arr_0` in uint8 (B, H, W, 3) batches without holding the whole array (ADM's streaming reader)."""
    path = Path(path)
    shape, dtype = _images_header(path)
    per_image = math.prod(shape[1:])
    with zipfile.ZipFile(path) as zf, zf.open(f"{IMAGES_KEY}.npy") as arr_f:
        read_npy_header(arr_f)
        for start in range(0, shape[0], batch_size):
            count = min(batch_size, shape[0] - start)
            data = arr_f.read(count * per_image)
            if len(data) != count * per_image:
                raise ValueError(
                    f"{path} is truncated: {IMAGES_KEY} ends before image {start + len(data) // per_image}."
                )
            yield np.frombuffer(bytearray(data), dtype=dtype).reshape(
                count, *shape[1:]
            )  # bytearray: writable for torch


def png_name(index: int) -> str:
    """File name of sample `index` in a sample folder (DiT's `sample_ddp.py` naming)."""
    return f"{index:06d}.png"


def save_png(image: np.ndarray, path: str | os.PathLike) -> Path:
    """One uint8 HWC image as a PNG (grey for 1 channel), atomically, so a resumed run never trusts a partial file."""
    with atomic_path(path) as tmp:
        Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(tmp, format="PNG")
    return Path(path)


def npz_from_png_folder(
    folder: str | os.PathLike,
    num: int,
    path: str | os.PathLike,
    labels: Optional[np.ndarray] = None,
    progress: bool = True,
) -> Path:
    """Assemble PNGs `000000.png` .. `{num-1:06d}.png` of `folder`, in index order, into one `.npz`."""
    folder = Path(folder)
    missing = [i for i in range(num) if not (folder / png_name(i)).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{folder} lacks {len(missing)} of {num} samples (first: {png_name(missing[0])}); rerun the sampler to fill them in."
        )
    indices = tqdm(range(num), desc="Building .npz", disable=not progress)
    images = np.stack([np.asarray(Image.open(folder / png_name(i))) for i in indices])
    if images.ndim == 3:
        images = images[..., None]  # grey PNGs: (N, H, W) -> (N, H, W, 1)
    return write_npz(path, images, labels)
