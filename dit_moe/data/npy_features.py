"""fast-DiT's pre-extracted features as a dataset.

fast-DiT's extract_features.py writes `<features_path>/imagenet256_features/<n>.npy`
(one (1, C, H, W) latent, already sampled and multiplied by 0.18215) and
`<features_path>/imagenet256_labels/<n>.npy` (a (1,) label). Pairs are matched by n.
`NpyFeatureDataset.check` reads every file's header (the start-up check, see `integrity.py`).
"""

from __future__ import annotations

import math
import os
from typing import List, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from dit_moe.data.integrity import READ_ERRORS, DataIntegrityError, check_npy_file

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
    return (
        os.path.join(features_path, pairs[0] + FEATURES_SUFFIX),
        os.path.join(features_path, pairs[0] + LABELS_SUFFIX),
    )


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
        self._reference_shape: Optional[Tuple[int, ...]] = None

    @property
    def latent_shape(self) -> Tuple[int, ...]:
        return tuple(self[0][0].shape)

    def paths(self, index: int) -> Tuple[str, str]:
        """(feature, label) files of item `index`."""
        name = self.stems[index] + ".npy"
        return os.path.join(self.features_dir, name), os.path.join(self.labels_dir, name)

    def check(self) -> None:
        """Raise `DataIntegrityError` naming the first file that is not the array its partners are.

        Headers and sizes only: every feature a float (1, C, H, W) or (C, H, W) array of the first one's
        shape, every label one integer, each file exactly as long as its header says.
        """
        for index in range(len(self)):
            self.check_item(index)

    def reference_shape(self) -> Tuple[int, ...]:
        """The shape of the first feature, which every feature must share (its header, checked)."""
        if self._reference_shape is None:
            self._reference_shape = _check_feature(*self.paths(0), like=None)
        return self._reference_shape

    def check_item(self, index: int) -> None:
        """Raise `DataIntegrityError` unless item `index`'s feature and label files are what `check` requires."""
        feature, label = self.paths(index)
        _check_feature(feature, label, like=(self.paths(0)[0], self.reference_shape()))
        _check_label(label, feature)

    def __len__(self) -> int:
        return len(self.stems)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        feature, label = self.paths(index)
        x, y = _load(feature, label), _load(label, feature)
        return torch.from_numpy(x.reshape(x.shape[-3:]).astype(np.float32)), int(
            y.reshape(-1)[0]
        )  # (1, C, H, W) -> (C, H, W)


def _fix(path: str, partner: str) -> str:
    """What to do about a bad feature or label file: the end of its error sentence."""
    return f"delete it and {partner!r} (or re-run fast-DiT's extract_features.py) and start again"


def _check_feature(feature: str, label: str, like: Optional[Tuple[str, Tuple[int, ...]]]) -> Tuple[int, ...]:
    """The shape of the latent in `feature`; raises unless it is a float latent of `like`'s (file, shape)."""
    shape, dtype = check_npy_file(feature, _fix(feature, label))
    reference, want = like or (feature, shape)
    if shape != want or dtype.kind != "f" or len(shape) not in (3, 4) or math.prod(shape[:-3]) != 1:
        raise DataIntegrityError(
            f"{feature!r} holds a {dtype} {shape} array, but every feature must be a float (1, C, H, W) latent of "
            f"one shape ({reference!r} holds {want}); {_fix(feature, label)}."
        )
    return shape


def _check_label(label: str, feature: str) -> None:
    """Raise unless `label` holds one integer."""
    shape, dtype = check_npy_file(label, _fix(label, feature))
    if math.prod(shape) != 1 or dtype.kind not in "iu":
        raise DataIntegrityError(
            f"{label!r} holds a {dtype} {shape} array, not one integer class label; {_fix(label, feature)}."
        )


def _load(path: str, partner: str) -> np.ndarray:
    """The array in `path`; a damaged file raises `DataIntegrityError` (numpy's own errors name no file)."""
    try:
        return np.load(path)
    except READ_ERRORS as err:
        raise DataIntegrityError(f"{path!r} could not be read ({err}); {_fix(path, partner)}.") from None
