"""FID, Inception Score and improved precision/recall of an ADM-style sample `.npz`.

Network: NVIDIA's TorchScript port of the TensorFlow Inception graph used by TTUR and
ADM's evaluator (`inception-2015-12-05.pt`, the detector of StyleGAN2-ADA/3, EDM and
clean-fid's "legacy_tensorflow" mode). It loads with plain `torch.jit.load`, so neither
torchvision nor TensorFlow is needed, and its pool_3 features match the TF graph's, so
FIDs are comparable with ADM's reference statistics (`VIRTUAL_imagenet256_labeled.npz`).
The libraries that wrap it (torch-fidelity, clean-fid, pytorch-fid) all import
torchvision at import time, which would pull a CUDA build of torch onto CPU machines.

Detector interface (NVIDIA's): `detector(uint8 NCHW RGB, return_features=True)` -> (N, 2048)
pool_3 features; `detector(x, no_output_bias=True)` -> (N, 1008) softmax probabilities with
the logits' bias dropped, as ADM computes them. Any image size works; it resizes to 299.

Metrics follow ADM's `evaluations/evaluator.py`:
    FID        |mu_1 - mu_2|^2 + tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2))      (Heusel et al. 2017)
    IS         exp E_x KL(p(y|x) || p(y)), averaged over splits of 5,000  (Salimans et al. 2016)
    precision  share of samples inside the k=3-NN balls of the reference features,
    recall     share of reference features inside the samples' balls      (Kynkaanniemi et al. 2019)
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import scipy.linalg
import torch
from tqdm.auto import tqdm

from .npz import iter_npz_images, read_npz, to_rgb, write_statistics

INCEPTION_FILENAME = "inception-2015-12-05.pt"
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
IS_SPLIT_SIZE = 5000
PR_NEIGHBOURHOOD = 3


@dataclass
class FeatureStatistics:
    """Mean and covariance of a feature set: the Gaussian that FID compares."""

    mu: np.ndarray  # (D,)
    sigma: np.ndarray  # (D, D)

    @classmethod
    def of(cls, features: np.ndarray) -> "FeatureStatistics":
        """Statistics of features (N, D), N >= 2, float64 as ADM computes them."""
        features = np.asarray(features, dtype=np.float64)
        if features.ndim != 2 or len(features) < 2:
            raise ValueError(f"Statistics need at least 2 feature vectors (N, D); got shape {features.shape}.")
        return cls(features.mean(axis=0), np.cov(features, rowvar=False))


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (TTUR/ADM formula and safeguards)."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(
            f"Statistics of different feature sizes: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}."
        )
    diff = mu1 - mu2
    with warnings.catch_warnings():
        # Feature covariances are often rank-deficient (N < D, dead ReLU units); scipy warns on every
        # such product although the root is usually fine. A non-finite root is caught just below.
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        # S_1 S_2 can be singular when N < D; regularise both as TTUR does.
        warnings.warn(f"Frechet distance: singular covariance product, adding {eps} to the diagonals.")
        offset = np.eye(len(sigma1)) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(
                f"Frechet distance: matrix square root has an imaginary part of {np.abs(covmean.imag).max():.3g}."
            )
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def inception_score(probs: np.ndarray, split_size: int = IS_SPLIT_SIZE) -> float:
    """Inception Score of class probabilities (N, K), mean over consecutive splits of `split_size` (ADM)."""
    scores = []
    for start in range(0, len(probs), split_size):
        part = np.asarray(probs[start : start + split_size], dtype=np.float64)
        kl = part * (np.log(part) - np.log(part.mean(axis=0, keepdims=True)))
        scores.append(np.exp(kl.sum(axis=1).mean()))
    return float(np.mean(scores))


def _pairwise_sq_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances (Na, Nb), as ADM's DistanceBlock."""
    return (a.square().sum(1, keepdim=True) - 2 * a @ b.T + b.square().sum(1)[None]).clamp_min(0)


def _knn_radii(features: torch.Tensor, k: int, block: int) -> torch.Tensor:
    """Squared distance of each feature to its k-th nearest neighbour (itself excluded): (N,)."""
    radii = [
        _pairwise_sq_distances(features[i : i + block], features).kthvalue(k + 1, dim=1).values
        for i in range(0, len(features), block)
    ]
    return torch.cat(radii)


def _coverage(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, block: int) -> float:
    """Share of `points` inside at least one ball (centre, squared radius)."""
    inside = [
        (_pairwise_sq_distances(points[i : i + block], centres) <= radii[None]).any(dim=1)
        for i in range(0, len(points), block)
    ]
    return float(torch.cat(inside).double().mean())


def precision_recall(
    ref_features: np.ndarray, sample_features: np.ndarray, k: int = PR_NEIGHBOURHOOD, block: int = 10000
) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) with k-NN manifolds, k = 3 as in ADM."""
    ref = torch.as_tensor(ref_features, dtype=torch.float64)
    sample = torch.as_tensor(sample_features, dtype=torch.float64)
    if min(len(ref), len(sample)) <= k:
        raise ValueError(f"Precision/recall with k={k} needs more than {k} reference and sample images.")
    ref_radii, sample_radii = _knn_radii(ref, k, block), _knn_radii(sample, k, block)
    return _coverage(sample, ref, ref_radii, block), _coverage(ref, sample, sample_radii, block)


class InceptionDetector:
    """NVIDIA's TorchScript Inception-v3 (TF weights) from a local file; see the module docstring."""

    def __init__(self, weights: str | os.PathLike, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.network = torch.jit.load(str(resolve_inception_weights(weights)), map_location=self.device).eval()

    @torch.no_grad()
    def __call__(
        self, images: np.ndarray, batch_size: int = 64, progress: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """(pool features (N, D), class probabilities (N, K)) of uint8 NHWC images, float64."""
        return self.embed((images[i : i + batch_size] for i in range(0, len(images), batch_size)), progress)

    @torch.no_grad()
    def embed(
        self, batches: Iterable[np.ndarray], progress: bool = False, total: Optional[int] = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """`__call__` over an iterable of uint8 NHWC batches (two forwards each: features, then probabilities)."""
        features, probs = [], []
        for images in tqdm(batches, desc="Inception features", total=total, disable=not progress):
            batch = torch.from_numpy(to_rgb(images)).permute(0, 3, 1, 2)  # NHWC -> NCHW
            batch = batch.to(self.device)
            features.append(self.network(batch, return_features=True).double().cpu())
            probs.append(self.network(batch, no_output_bias=True).double().cpu())
        return torch.cat(features).numpy(), torch.cat(probs).numpy()


def resolve_inception_weights(weights: Optional[str | os.PathLike]) -> Path:
    """The TorchScript file: `weights` itself, or `weights/inception-2015-12-05.pt` for a folder."""
    path = Path(weights) if weights else None
    if path is not None and path.is_dir():
        path = path / INCEPTION_FILENAME
    if path is None or not path.is_file():
        raise FileNotFoundError(
            f"Inception weights not found at {weights!r}: download {INCEPTION_FILENAME} from {INCEPTION_URL} "
            f"(NVIDIA's TorchScript port of the TF FID network) and pass its path (or folder) as --inception-weights."
        )
    return path


@dataclass
class ImageSetFeatures:
    """Inception outputs of one image set, or only its precomputed statistics."""

    stats: FeatureStatistics
    features: Optional[np.ndarray] = None  # (N, D), None when read from precomputed statistics
    probs: Optional[np.ndarray] = None  # (N, K)


def npz_features(
    path: str | os.PathLike, detector: InceptionDetector, batch_size: int = 64, progress: bool = False
) -> ImageSetFeatures:
    """Features of an `.npz`: stored `mu`/`sigma` are used for FID as ADM does; images (if any) are also embedded."""
    batch = read_npz(path, load_images=False)
    features = probs = None
    if batch.num_images:
        total = -(-batch.num_images // batch_size)
        features, probs = detector.embed(iter_npz_images(path, batch_size), progress, total)
    stats = FeatureStatistics(batch.mu, batch.sigma) if batch.mu is not None else FeatureStatistics.of(features)
    return ImageSetFeatures(stats, features, probs)


def evaluate(
    samples: str | os.PathLike,
    ref: str | os.PathLike,
    inception_weights: str | os.PathLike,
    device: str | torch.device = "cpu",
    batch_size: int = 64,
    progress: bool = False,
) -> dict[str, float]:
    """FID of `samples` against `ref` (images or statistics), plus IS and, when `ref` has images, precision/recall."""
    detector = InceptionDetector(inception_weights, device)
    sample_set = npz_features(samples, detector, batch_size, progress)
    if sample_set.features is None:
        raise ValueError(f"{samples} holds statistics only; the samples must be images (arr_0).")
    ref_set = npz_features(ref, detector, batch_size, progress)
    if ref_set.stats.mu.shape != sample_set.stats.mu.shape:
        raise ValueError(
            f"{ref} has {ref_set.stats.mu.shape[0]}-d statistics but the detector gives {sample_set.stats.mu.shape[0]}-d features; "
            "recompute the reference statistics with this network."
        )
    results = {
        "fid": frechet_distance(sample_set.stats.mu, sample_set.stats.sigma, ref_set.stats.mu, ref_set.stats.sigma),
        "inception_score": inception_score(sample_set.probs),
        "num_samples": float(len(sample_set.features)),
    }
    if ref_set.features is not None:
        results["precision"], results["recall"] = precision_recall(ref_set.features, sample_set.features)
    return results


def save_reference_statistics(
    images_npz: str | os.PathLike,
    out: str | os.PathLike,
    inception_weights: str | os.PathLike,
    device: str | torch.device = "cpu",
    batch_size: int = 64,
    progress: bool = False,
) -> Path:
    """Compute `mu`/`sigma` of a reference image batch once and store them (ADM key names)."""
    batch = npz_features(images_npz, InceptionDetector(inception_weights, device), batch_size, progress)
    return write_statistics(out, batch.stats.mu, batch.stats.sigma)
