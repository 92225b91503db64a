"""Image preprocessing shared by the folder dataset and latent extraction (PIL + numpy only)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def center_crop_arr(image: Image.Image, image_size: int) -> np.ndarray:
    """ADM's centre crop: an (image_size, image_size, C) uint8 array.

    Halve with a BOX filter while the short side is at least twice the target (cheap
    anti-aliasing), resize with BICUBIC so the short side equals `image_size`, then crop
    the centre. Same arithmetic as guided-diffusion / DiT, so latents match theirs.
    """
    while min(image.size) >= 2 * image_size:
        image = image.resize(tuple(side // 2 for side in image.size), resample=Image.BOX)
    scale = image_size / min(image.size)
    image = image.resize(tuple(round(side * scale) for side in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return arr[top : top + image_size, left : left + image_size]


def to_tensor(arr: np.ndarray) -> torch.Tensor:
    """(H, W, C) uint8 -> (C, H, W) float32 in [-1, 1]."""
    x = torch.from_numpy(np.array(arr)).permute(2, 0, 1).float()  # (H, W, C) -> (C, H, W)
    return x / 127.5 - 1.0


def hflip(x: torch.Tensor) -> torch.Tensor:
    """Mirror left-right (last axis), for images and latents alike."""
    return x.flip(-1)


def flip_coin(seed: int, epoch: int, index: int) -> bool:
    """The random-flip decision for one sample: a function of (seed, epoch, index) only.

    Per-sample seeding keeps the augmentation identical whatever the number of ranks or
    workers, and when a run is resumed mid-epoch.
    """
    return bool(np.random.default_rng([seed, epoch, index]).random() < 0.5)
