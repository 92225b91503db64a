"""Frechet distance against closed forms, IS / precision-recall sanity, Inception loading and the fid CLI."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dit_moe.evaluation import __main__ as cli
from dit_moe.evaluation.fid import (
    INCEPTION_FILENAME,
    FeatureStatistics,
    frechet_distance,
    inception_score,
    precision_recall,
    resolve_inception_weights,
)
from dit_moe.evaluation.npz import write_npz


def _random_spd(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def _psd_sqrt(m):
    w, v = np.linalg.eigh(m)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def test_diagonal_gaussians_match_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    s1, s2 = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-9)


def test_full_covariance_matches_eigendecomposition():
    rng = np.random.default_rng(1)
    d = 12
    mu1, mu2, s1, s2 = rng.normal(size=d), rng.normal(size=d), _random_spd(rng, d), _random_spd(rng, d)
    root1 = _psd_sqrt(s1)
    # tr (S1 S2)^(1/2) = tr (S1^(1/2) S2 S1^(1/2))^(1/2), the symmetric form
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(_psd_sqrt(root1 @ s2 @ root1))
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0, abs=1e-8)


def test_statistics_of_features():
    x = np.random.default_rng(2).normal(size=(50, 3))
    stats = FeatureStatistics.of(x)
    np.testing.assert_allclose(stats.mu, x.mean(0))
    np.testing.assert_allclose(stats.sigma, np.cov(x.T))


def test_inception_score_extremes():
    assert inception_score(np.full((20, 5), 0.2)) == pytest.approx(1.0)
    assert inception_score(np.eye(5)[np.arange(20) % 5] * (1 - 1e-9) + 1e-9 / 5) == pytest.approx(5.0, rel=1e-4)


def test_precision_recall_brute_force():
    rng = np.random.default_rng(3)
    ref, sample = rng.normal(size=(30, 4)), rng.normal(size=(25, 4)) + 0.5

    def coverage(points, centres):
        d = ((centres[:, None] - centres[None]) ** 2).sum(-1)
        radii = np.sort(d, axis=1)[:, 3]  # 3rd neighbour, itself at position 0
        return np.mean([(((centres - p) ** 2).sum(-1) <= radii).any() for p in points])

    precision, recall = precision_recall(ref, sample)
    assert precision == pytest.approx(coverage(sample, ref))
    assert recall == pytest.approx(coverage(ref, sample))
    assert precision_recall(ref, ref + 100.0) == (0.0, 0.0)


def test_missing_inception_weights_say_where_to_get_them(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match=INCEPTION_FILENAME):
        resolve_inception_weights(tmp_path)
    write_npz(tmp_path / "s.npz", np.zeros((4, 8, 8, 3), np.uint8))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["fid", "--samples", str(tmp_path / "s.npz"), "--ref", str(tmp_path / "s.npz")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--inception-weights" in err and err.count("\n") == 1, err


class _FakeInception(torch.nn.Module):
    """Stands in for NVIDIA's TorchScript Inception: same call signature, tiny features."""

    def __init__(self):
        super().__init__()
        self.register_buffer("w", torch.randn(12, 5, generator=torch.Generator().manual_seed(0)))

    def forward(
        self, img: torch.Tensor, return_features: bool = False, use_fp16: bool = False, no_output_bias: bool = False
    ) -> torch.Tensor:
        features = F.adaptive_avg_pool2d(img.float() / 255, 2).flatten(1)  # (N, 3, H, W) -> (N, 12)
        if return_features:
            return features
        return torch.softmax(features @ self.w, dim=1)


def test_fid_cli_with_torchscript_detector(tmp_path):
    weights = tmp_path / INCEPTION_FILENAME
    torch.jit.script(_FakeInception()).save(str(weights))
    rng = np.random.default_rng(0)
    real = rng.integers(0, 256, (40, 8, 8, 3), dtype=np.uint8)
    shifted = np.clip(real.astype(int) + 60, 0, 255).astype(np.uint8)
    for name, images in (("real", real), ("shifted", shifted)):
        write_npz(tmp_path / f"{name}.npz", images)
    common = ["--inception-weights", str(tmp_path), "--device", "cpu", "--batch-size", "16"]
    same = cli.run(["fid", "--samples", str(tmp_path / "real.npz"), "--ref", str(tmp_path / "real.npz"), *common])
    other = cli.run(["fid", "--samples", str(tmp_path / "shifted.npz"), "--ref", str(tmp_path / "real.npz"), *common])
    assert same["fid"] == pytest.approx(0, abs=1e-6) and same["precision"] == 1.0
    assert other["fid"] > 0.01 and 1.0 <= other["inception_score"] <= 5.0
    cli.run(["stats", "--images", str(tmp_path / "real.npz"), "--out", str(tmp_path / "ref_stats.npz"), *common])
    from_stats = cli.run(
        ["fid", "--samples", str(tmp_path / "shifted.npz"), "--ref", str(tmp_path / "ref_stats.npz"), *common]
    )
    assert from_stats["fid"] == pytest.approx(other["fid"], rel=1e-6)
    assert "precision" not in from_stats
