"""A laptop-sized quality score for models trained on the built-in digits (`--dataset digits`).

FID's Inception network knows nothing of 8x8 digits and needs weights we cannot ship, so
the digits get their own judge: a small MLP (64 -> 64 ReLU -> 10) trained on the real
digits' fixed train split, seen the way samples will be seen (upsampled to the training
resolution, then area-averaged back to 8x8 grey). It gives two numbers for conditional samples:

    label_accuracy     share of samples classified as the label they were conditioned on
    frechet_distance   Frechet distance of the samples' hidden-layer features (64-d) to those of
                       real held-out digits ("digits-FD"; FID's formula, a different network)

The held-out split (360 digits, stratified, seed 0, from `dit_moe.data.digits`) is halved:
one half is the FD reference, the other scores the real data (`real_ceiling`), the best a
model can hope for at that sample count. FD, like FID, grows as n shrinks: compare numbers
at similar n.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..data.digits import NUM_DIGIT_CLASSES, digits_arrays
from ..utils.atomic import atomic_path
from .fid import FeatureStatistics, frechet_distance

DIGIT_SIZE = 8
FIT_IMAGE_SIZE = 32
HIDDEN_UNITS = 64
CACHE_VERSION = 1


def images_to_digit_inputs(images: np.ndarray | torch.Tensor) -> np.ndarray:
    """Classifier inputs (N, 64) in [-1, 1] from float (N, C, H, W) in [-1, 1] or uint8 NHWC images.

    Channels are averaged to grey and the image is area-averaged to 8x8 (H and W multiples of 8).
    """
    x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images.detach().cpu())
    if x.ndim != 4:
        raise ValueError(f"Expected a batch of images with 4 dimensions, got shape {tuple(x.shape)}.")
    if x.dtype == torch.uint8:
        x = x.permute(0, 3, 1, 2).float() / 127.5 - 1  # uint8 NHWC -> float NCHW in [-1, 1]
    x = x.float().mean(dim=1, keepdim=True)  # (N, C, H, W) -> (N, 1, H, W)
    if x.shape[-1] % DIGIT_SIZE or x.shape[-2] % DIGIT_SIZE:
        raise ValueError(f"Digit images must have sides that are multiples of {DIGIT_SIZE}, got {tuple(x.shape[-2:])}.")
    x = F.adaptive_avg_pool2d(x, DIGIT_SIZE)  # (N, 1, H, W) -> (N, 1, 8, 8)
    return x.reshape(len(x), -1).numpy().astype(np.float64)  # (N, 64)


@dataclass(frozen=True)
class DigitsMLP:
    """The classifier's weights: 64 grey pixels -> HIDDEN_UNITS ReLU features -> 10 logits."""

    w_hidden: np.ndarray  # (64, HIDDEN_UNITS)
    b_hidden: np.ndarray  # (HIDDEN_UNITS,)
    w_out: np.ndarray  # (HIDDEN_UNITS, 10)
    b_out: np.ndarray  # (10,)

    def features(self, inputs: np.ndarray) -> np.ndarray:
        """Hidden-layer (penultimate) activations (N, HIDDEN_UNITS) of classifier inputs (N, 64)."""
        return np.maximum(inputs @ self.w_hidden + self.b_hidden, 0)

    def predict(self, inputs: np.ndarray) -> np.ndarray:
        """Predicted class (N,) of classifier inputs (N, 64)."""
        return (self.features(inputs) @ self.w_out + self.b_out).argmax(axis=1)


@dataclass(frozen=True)
class DigitsScorer:
    """A fitted digits classifier plus the FD reference statistics; build it with `DigitsScorer.fit`."""

    mlp: DigitsMLP
    reference: FeatureStatistics  # hidden features of the reference half of the held-out digits
    heldout_accuracy: float  # classifier accuracy on the other half
    seed: int = 0

    @classmethod
    def fit(cls, seed: int = 0, cache_dir: Optional[str | os.PathLike] = None) -> "DigitsScorer":
        """Train on the digits train split (a few seconds on a CPU), or read the fit from `cache_dir`."""
        cache = Path(cache_dir) / f"digits_scorer_v{CACHE_VERSION}_seed{seed}.npz" if cache_dir else None
        if cache is not None and cache.is_file():
            return cls.load(cache)
        from sklearn.neural_network import MLPClassifier

        x_train, y_train = _split_inputs("train")
        classifier = MLPClassifier(
            hidden_layer_sizes=(HIDDEN_UNITS,),
            alpha=1e-3,
            batch_size=128,
            learning_rate_init=1e-2,
            max_iter=150,
            random_state=seed,
        )
        classifier.fit(x_train, y_train)
        mlp = DigitsMLP(
            classifier.coefs_[0], classifier.intercepts_[0], classifier.coefs_[1], classifier.intercepts_[1]
        )
        (x_ref, _), (x_eval, y_eval) = _heldout_halves()
        accuracy = float((mlp.predict(x_eval) == y_eval).mean())
        scorer = cls(mlp, FeatureStatistics.of(mlp.features(x_ref)), accuracy, seed)
        if cache is not None:
            scorer.save(cache)
        return scorer

    def save(self, path: str | os.PathLike) -> Path:
        """Store the fit as plain arrays (no pickle), atomically."""
        arrays = {name: getattr(self.mlp, name) for name in DigitsMLP.__dataclass_fields__}
        arrays.update(
            mu=self.reference.mu, sigma=self.reference.sigma, heldout_accuracy=self.heldout_accuracy, seed=self.seed
        )
        with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: np.savez adds no .npz suffix
            np.savez(f, **arrays)
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "DigitsScorer":
        with np.load(path) as data:
            mlp = DigitsMLP(**{name: data[name] for name in DigitsMLP.__dataclass_fields__})
            return cls(
                mlp, FeatureStatistics(data["mu"], data["sigma"]), float(data["heldout_accuracy"]), int(data["seed"])
            )

    def score(self, images: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor) -> dict[str, float]:
        """{"label_accuracy", "frechet_distance", "n"} of conditional samples: float (N, C, H, W) in [-1, 1] or uint8 NHWC."""
        inputs = images_to_digit_inputs(images)
        labels = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels).reshape(-1)
        if len(labels) != len(inputs):
            raise ValueError(f"{len(labels)} labels for {len(inputs)} images; pass one label per image.")
        if labels.min() < 0 or labels.max() >= NUM_DIGIT_CLASSES:
            raise ValueError(f"Digit labels lie in 0..{NUM_DIGIT_CLASSES - 1}, got {labels.min()}..{labels.max()}.")
        stats = FeatureStatistics.of(self.mlp.features(inputs))
        return {
            "label_accuracy": float((self.mlp.predict(inputs) == labels).mean()),
            "frechet_distance": frechet_distance(stats.mu, stats.sigma, self.reference.mu, self.reference.sigma),
            "n": len(labels),
        }

    def real_ceiling(self) -> dict[str, float]:
        """`score` of the real held-out digits not used as the FD reference: the best a model can reach at this n."""
        _, (x_eval, y_eval) = _heldout_halves(as_images=True)
        return self.score(x_eval, y_eval)


def _split_inputs(split: str) -> tuple[np.ndarray, np.ndarray]:
    x, y = digits_arrays(split, image_size=FIT_IMAGE_SIZE, channels=1)
    return images_to_digit_inputs(x), y


def _heldout_halves(as_images: bool = False) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """The held-out split halved by alternating position within each class: (reference, evaluation)."""
    x, y = digits_arrays("test", image_size=FIT_IMAGE_SIZE, channels=1)
    rank_in_class = np.zeros(len(y), dtype=np.int64)
    for label in range(NUM_DIGIT_CLASSES):
        members = np.flatnonzero(y == label)
        rank_in_class[members] = np.arange(len(members))
    ref, ev = rank_in_class % 2 == 0, rank_in_class % 2 == 1
    convert = (lambda a: a) if as_images else images_to_digit_inputs
    return (convert(x[ref]), y[ref]), (convert(x[ev]), y[ev])
