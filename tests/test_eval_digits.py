"""Digits quality score: a good classifier, and real held-out digits rank above noise and shuffled labels."""

import numpy as np
import pytest
import torch

from dit_moe.data.digits import digits_arrays
from dit_moe.evaluation import DigitsScorer
from dit_moe.evaluation import __main__ as cli
from dit_moe.evaluation.npz import to_uint8_nhwc, write_npz


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("digits_cache")


@pytest.fixture(scope="module")
def scorer(cache_dir):
    return DigitsScorer.fit(seed=0, cache_dir=cache_dir)


@pytest.fixture(scope="module")
def heldout():
    return digits_arrays("test", image_size=16, channels=3)


def test_classifier_is_accurate_and_real_digits_score_high(scorer):
    assert scorer.heldout_accuracy > 0.9
    ceiling = scorer.real_ceiling()
    assert ceiling["label_accuracy"] == pytest.approx(scorer.heldout_accuracy)
    assert ceiling["n"] > 150 and ceiling["frechet_distance"] < 10


def test_real_ranks_above_noise_and_shuffled_labels(scorer, heldout):
    x, y = heldout
    real = scorer.score(x, y)
    noise = scorer.score(np.random.default_rng(0).uniform(-1, 1, x.shape).astype(np.float32), y)
    shuffled = scorer.score(x, np.random.default_rng(0).permutation(y))
    assert real["label_accuracy"] > 0.9
    assert noise["label_accuracy"] < 0.3 and shuffled["label_accuracy"] < 0.3
    assert real["frechet_distance"] < noise["frechet_distance"] / 10
    assert real["n"] == len(y)


def test_uint8_input_and_cache_give_the_same_scores(scorer, heldout, cache_dir):
    x, y = heldout
    from_float = scorer.score(torch.from_numpy(x[:50]), y[:50])
    from_uint8 = scorer.score(to_uint8_nhwc(x[:50]), y[:50])
    assert from_uint8["label_accuracy"] == pytest.approx(from_float["label_accuracy"], abs=0.05)
    assert list(cache_dir.glob("*.npz"))
    cached = DigitsScorer.fit(seed=0, cache_dir=cache_dir)
    assert cached.score(x[:50], y[:50]) == scorer.score(x[:50], y[:50])


def test_digits_cli_scores_an_npz(scorer, heldout, tmp_path, cache_dir):
    x, y = heldout
    write_npz(tmp_path / "digits.npz", x, y)
    results = cli.run(["digits", "--samples", str(tmp_path / "digits.npz"), "--cache-dir", str(cache_dir)])
    assert results["samples"]["label_accuracy"] > 0.9
    assert set(results["real_ceiling"]) == {"label_accuracy", "frechet_distance", "n"}
