"""Built-in dataset: scikit-learn's 1,797 real 8x8 handwritten digits (bundled, no download).

Upsampled to `image_size` (bilinear), grey replicated to `channels`, scaled to [-1, 1];
pixel space. The train/test split is fixed (stratified, seed 0) so the evaluation
classifier and every run agree on which digits were held out.
"""

from __future__ import annotations

from typing import Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

NUM_DIGIT_CLASSES = 10
DIGITS_MAX_VALUE = 16.0
TEST_FRACTION = 0.2
SPLIT_SEED = 0
SPLITS = ("train", "test", "all")


def digits_arrays(split: str = "all", image_size: int = 32, channels: int = 3) -> Tuple[np.ndarray, np.ndarray]:
    """(x, y): x float32 (N, channels, image_size, image_size) in [-1, 1], y int64 (N,) in 0..9.

    split: "all" (1,797), or the fixed stratified "train" / "test" parts (80 / 20 %).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if split not in SPLITS:
        raise ValueError(f"Unknown digits split {split!r}; use one of {SPLITS}.")
    if channels not in (1, 3):
        raise ValueError(f"Digits have 1 (grey) or 3 (grey replicated) channels, not {channels}.")
    digits = load_digits()
    images = torch.from_numpy(digits.images).float().unsqueeze(1)  # (N, 8, 8) -> (N, 1, 8, 8)
    images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = (images / DIGITS_MAX_VALUE * 2 - 1).clamp(-1, 1).expand(-1, channels, -1, -1).numpy().astype(np.float32)
    y = digits.target.astype(np.int64)
    if split == "all":
        return x, y
    train_idx, test_idx = train_test_split(
        np.arange(len(y)), test_size=TEST_FRACTION, random_state=SPLIT_SEED, stratify=y
    )
    keep = np.sort(train_idx if split == "train" else test_idx)
    return x[keep], y[keep]


class DigitsDataset(Dataset):
    """Map-style view of `digits_arrays`: items are (x (C, S, S) float in [-1, 1], y int)."""

    num_classes = NUM_DIGIT_CLASSES

    def __init__(self, split: str = "all", image_size: int = 32, channels: int = 3):
        x, y = digits_arrays(split, image_size, channels)
        self.x = torch.from_numpy(x)
        self.y = torch.from_numpy(y)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        return self.x[index], int(self.y[index])
