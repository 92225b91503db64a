"""fast-DiT's pre-extracted features as a dataset.

fast-DiT's extract_features.py writes `<features_path>/imagenet256_features/<n>.npy`
(one (1, C, H, W) latent, already sampled and multiplied by 0.18215) and
`<features_path>/imagenet256_labels/<n>.npy` (a (1,) label). Pairs are matched by n.
"""

from __future__ import annotations

import os
from typing import List, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

FEATURES_SUFFIX = "_features"
LABELS_SUFFIX = "_labels"


def find_feature_dirs(features_path: str) -> Tuple[str, str]:
    """The (features, labels) folder pair under `features_path`, e.g. imagenet256_features / imagenet256_labels."""
    if not os.path.isdir(features_path):
        raise FileNotFoundError(
            f"Features folder {features_path!r} does not exist: point --features-path at the folder holding "
            f"fast-DiT's <name>_features/ and <name>_labels/ folders."
        )
    pairs = sorted(
        entry.name[: -len(FEATURES_SUFFIX)]
        for entry in os.scandir(features_path)
        if entry.is_dir()
        and entry.name.endswith(FEATURES_SUFFIX)
        and os.path.isdir(os.path.join(features_path, entry.name[: -len(FEATURES_SUFFIX)] + LABELS_SUFFIX))
    )
    if len(pairs) != 1:
        raise FileNotFoundError(
            f"Features folder {features_path!r} holds {len(pairs)} <name>_features/ + <name>_labels/ folder "
            f"pairs {pairs}; it needs exactly one (as fast-DiT's extract_features.py writes)."
        )
    return (os.path.join(features_path, pairs[0] + FEATURES_SUFFIX), os.path.join(features_path, pairs[0] + LABELS_SUFFIX))


def _numbered_npy(folder: str) -> List[str]:
    """`<n>.npy` stems of `folder` sorted by n."""
    stems = [name[:-4] for name in os.listdir(folder) if name.endswith(".npy")]
    return sorted(stems, key=lambda stem: int(stem) if stem.isdigit() else stem)


class NpyFeatureDataset(Dataset):
    """Items are (latent (C, H, W) float32, already scaled, label int)."""

    def __init__(self, features_path: str):
        self.features_dir, self.labels_dir = find_feature_dirs(features_path)
        features, labels = _numbered_npy(self.features_dir), _numbered_npy(self.labels_dir)
        if features != labels:
            missing = sorted(set(features) ^ set(labels))[:5]
            raise FileNotFoundError(
                f"{self.features_dir!r} and {self.labels_dir!r} hold different file numbers (e.g. {missing}); "
                f"re-run the extraction so every feature has its label."
            )
        if not features:
            raise FileNotFoundError(f"{self.features_dir!r} holds no .npy files; run the feature extraction first.")
        self.stems = features

    @property
    def latent_shape(self) -> Tuple[int, ...]:
        return tuple(self[0][0].shape)

    def __len__(self) -> int:
        return len(self.stems)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        stem = self.stems[index]
        x = np.load(os.path.join(self.features_dir, stem + ".npy"))
        y = np.load(os.path.join(self.labels_dir, stem + ".npy"))
        return torch.from_numpy(x.reshape(x.shape[-3:]).astype(np.float32)), int(y.reshape(-1)[0])  # (1, C, H, W) -> (C, H, W)
