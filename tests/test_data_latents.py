"""Latent extraction -> webdataset shards -> streaming loader, and fast-DiT .npy features."""

import os

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from dit_moe.data import DataConfig, LatentShardStream, NpyFeatureDataset, build_train_loader
from dit_moe.data.extract import ExtractConfig, parse_args, run_extraction
from dit_moe.data.folder import ImageFolderDataset
from dit_moe.data.latents import LatentView
from dit_moe.data.shards import Manifest, decode_sample, read_shard, shard_name, write_shard
from dit_moe.data.vae import load_codec

from test_vae import save_tiny_vae

SCALE = 0.18215


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        os.makedirs(root / c)
        for i in range(5):
            Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return str(root)


@pytest.fixture(scope="module")
def vae_path(tmp_path_factory):
    return save_tiny_vae(tmp_path_factory.mktemp("vae"))


class CountingCodec(torch.nn.Module):
    """Wraps a codec and counts encoder calls."""

    def __init__(self, codec):
        super().__init__()
        self.codec, self.calls = codec, 0
        self.latent_channels, self.latent_size = codec.latent_channels, codec.latent_size

    def encode_distribution(self, images):
        self.calls += 1
        return self.codec.encode_distribution(images)


def _extract_cfg(image_folder, vae_path, out, **kw):
    return ExtractConfig(
        image_folder, vae_path, str(out), image_size=16, shard_size=3, batch_size=2, num_workers=0, **kw
    )


def test_extraction_round_trip(image_folder, vae_path, tmp_path):
    cfg = _extract_cfg(image_folder, vae_path, tmp_path)
    assert run_extraction(cfg) == [0, 1, 2, 3]
    manifest = Manifest.load(str(tmp_path))
    assert (manifest.num_samples, manifest.num_shards, manifest.latent_shape) == (10, 4, [4, 8, 8])
    assert manifest.classes == ["cat", "dog"] and manifest.image_size == 16 and manifest.scale_factor == SCALE
    assert manifest.vae_name == os.path.basename(vae_path)

    images = ImageFolderDataset(image_folder, 16)
    codec = load_codec(vae_path)
    stored = {}
    for s in range(4):
        for raw in read_shard(str(tmp_path / shard_name(s))):
            index, mean, std, label = decode_sample(raw)
            assert index in manifest.shard_range(s) and mean.dtype == np.float16 and mean.shape == (2, 4, 8, 8)
            stored[index] = (mean, std, label)
    assert sorted(stored) == list(range(10))
    x = torch.stack([images[i][0] for i in range(10)])
    mean, std = codec.encode_distribution(torch.cat([x, x.flip(-1)]))
    for i in range(10):
        torch.testing.assert_close(
            torch.from_numpy(stored[i][0]).float(), torch.stack([mean[i], mean[10 + i]]), atol=2e-3, rtol=2e-3
        )
        torch.testing.assert_close(
            torch.from_numpy(stored[i][1]).float(), torch.stack([std[i], std[10 + i]]), atol=2e-3, rtol=2e-3
        )
        assert stored[i][2] == images[i][1]

    # the training loader gives back the same latents (mean, plain view) and labels
    loader = build_train_loader(
        DataConfig(
            "latents",
            features_path=str(tmp_path),
            image_size=16,
            num_workers=0,
            random_flip=False,
            sample_latents=False,
            shuffle_buffer=4,
        ),
        0,
        1,
        5,
        seed=0,
    )
    assert (loader.input_channels, loader.input_size, loader.num_classes, loader.needs_encoding) == (4, 8, 2, False)
    stream = loader.stream
    stream.num_epochs = 1
    got = list(stream)
    assert sorted(i for _, _, i in got) == list(range(10))
    for latent, label, index in got:
        np.testing.assert_allclose(latent.numpy(), stored[index][0][0].astype(np.float32) * SCALE, rtol=1e-6)
        assert label == stored[index][2]


def test_extraction_resumes_and_splits_by_rank(image_folder, vae_path, tmp_path):
    cfg = _extract_cfg(image_folder, vae_path, tmp_path)
    codec = CountingCodec(load_codec(vae_path))
    assert run_extraction(cfg, rank=1, world_size=2, codec=codec) == [1, 3]
    assert sorted(f for f in os.listdir(tmp_path) if f.endswith(".tar")) == [shard_name(1), shard_name(3)]
    assert run_extraction(cfg, rank=0, world_size=2, codec=codec) == [0, 2]
    mtimes = {s: os.stat(tmp_path / shard_name(s)).st_mtime_ns for s in range(4)}
    os.remove(tmp_path / shard_name(2))
    codec.calls = 0
    assert run_extraction(cfg, codec=codec) == [2]
    assert codec.calls == 2  # shard 2 holds 3 images, batch size 2
    assert all(os.stat(tmp_path / shard_name(s)).st_mtime_ns == mtimes[s] for s in (0, 1, 3))
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]
    with pytest.raises(ValueError, match="different settings"):
        run_extraction(
            ExtractConfig(image_folder, vae_path, str(tmp_path), image_size=16, shard_size=4, num_workers=0),
            codec=codec,
        )


def test_extract_cli_accepts_both_flag_spellings():
    cfg = parse_args(["--data_path", "a", "--vae-path", "none", "--feature-path", "o", "--shard-size", "7"])
    assert (cfg.data_path, cfg.vae_path, cfg.features_path, cfg.shard_size) == ("a", "none", "o", 7)


def _synthetic_shards(root, sizes, latent_shape=(2, 2, 2), std=0.0):
    """Shards with mean[view] = (+1 plain / -1 flipped) * (index + 1) so values reveal index and view."""
    index = 0
    for s, size in enumerate(sizes):
        samples = []
        for _ in range(size):
            mean = np.stack([np.full(latent_shape, index + 1.0), np.full(latent_shape, -(index + 1.0))])
            samples.append((index, mean, np.full_like(mean, std), index % 3))
            index += 1
        write_shard(os.path.join(root, shard_name(s)), samples)
    Manifest(index, sizes[0], list(latent_shape), 3, 16, "none", "none", 1.0).save(str(root))
    return index


def _epoch_indices(root, rank, world_size, num_workers, seed=0):
    stream = LatentShardStream(
        str(root), rank, world_size, seed, shuffle_buffer=5, view=LatentView(scale_factor=1.0), num_epochs=1
    )
    return [int(i) for _, _, i in DataLoader(stream, batch_size=None, num_workers=num_workers)]


def test_two_ranks_two_workers_cover_every_sample_once(tmp_path):
    n = _synthetic_shards(tmp_path, [6] * 7 + [5])
    seen = _epoch_indices(tmp_path, 0, 2, 2) + _epoch_indices(tmp_path, 1, 2, 2)
    assert sorted(seen) == list(range(n))
    one = _epoch_indices(tmp_path, 0, 1, 0)
    assert sorted(one) == list(range(n)) and one != list(range(n))  # shuffled


def test_stream_is_deterministic_and_samples_flip_and_noise(tmp_path):
    _synthetic_shards(tmp_path, [6] * 4)
    assert _epoch_indices(tmp_path, 0, 1, 0, seed=1) == _epoch_indices(tmp_path, 0, 1, 0, seed=1)
    assert _epoch_indices(tmp_path, 0, 1, 0, seed=1) != _epoch_indices(tmp_path, 0, 1, 0, seed=2)
    stream = LatentShardStream(str(tmp_path), view=LatentView(scale_factor=0.5), num_epochs=2)
    views = {}
    for latent, label, index in stream:
        assert torch.allclose(latent.abs(), torch.full_like(latent, 0.5 * (index + 1)))  # std = 0: exactly the mean
        assert label == index % 3
        views.setdefault(index, set()).add(bool(latent[0, 0, 0] < 0))
    assert any(True in v for v in views.values()) and any(False in v for v in views.values())
    assert any(len(v) == 2 for v in views.values())  # flip choice is redrawn each epoch


def test_stream_samples_from_std(tmp_path):
    _synthetic_shards(tmp_path, [4], latent_shape=(1, 8, 8), std=1.0)
    latent, _, index = next(
        iter(LatentShardStream(str(tmp_path), view=LatentView(random_flip=False, scale_factor=1.0)))
    )
    noise = latent - (index + 1)
    assert 0.5 < noise.std() < 1.5


@pytest.mark.parametrize("num_workers", [0, 2])
def test_shard_loader_resume_gives_the_same_batches(tmp_path, num_workers):
    _synthetic_shards(tmp_path, [5] * 8)
    cfg = DataConfig("latents", features_path=str(tmp_path), image_size=16, num_workers=num_workers, shuffle_buffer=4)
    loader = build_train_loader(cfg, 1, 2, 3, seed=7)
    for _ in range(5):
        next(loader)
    state = loader.state_dict()
    expected = [next(loader) for _ in range(6)]  # crosses the epoch boundary (20 samples per rank per epoch)
    assert loader.epoch >= 1
    resumed = build_train_loader(cfg, 1, 2, 3, seed=7)
    resumed.load_state_dict(state)
    assert resumed.epoch == 0
    for (x, y), (rx, ry) in zip(expected, (next(resumed) for _ in range(6))):
        assert torch.equal(x, rx) and torch.equal(y, ry)
    with pytest.raises(ValueError, match="same settings"):
        build_train_loader(cfg, 1, 2, 4, seed=7).load_state_dict(state)


def test_shard_loader_errors(tmp_path):
    _synthetic_shards(tmp_path, [5] * 2)
    with pytest.raises(ValueError, match="at least 4"):
        build_train_loader(DataConfig("latents", features_path=str(tmp_path), image_size=16, num_workers=2), 0, 2, 2, 0)
    with pytest.raises(ValueError, match="--image-size 16"):
        build_train_loader(DataConfig("latents", features_path=str(tmp_path), num_workers=0), 0, 1, 2, 0)
    os.remove(tmp_path / shard_name(1))
    with pytest.raises(FileNotFoundError, match="run it again"):
        DataConfig("latents", features_path=str(tmp_path)).check()


def test_fast_dit_npy_features(tmp_path):
    os.makedirs(tmp_path / "imagenet256_features")
    os.makedirs(tmp_path / "imagenet256_labels")
    for n in range(12):
        np.save(tmp_path / "imagenet256_features" / f"{n}.npy", np.full((1, 4, 2, 2), n, dtype=np.float32))
        np.save(tmp_path / "imagenet256_labels" / f"{n}.npy", np.array([n % 5]))
    ds = NpyFeatureDataset(str(tmp_path))
    assert len(ds) == 12 and ds.stems[:3] == ["0", "1", "2"] and ds.stems[10] == "10"
    x, y = ds[10]
    assert x.shape == (4, 2, 2) and float(x[0, 0, 0]) == 10 and y == 0
    with pytest.raises(ValueError, match="num-classes"):
        DataConfig("npy", features_path=str(tmp_path))
    loader = build_train_loader(
        DataConfig("npy", features_path=str(tmp_path), num_classes=5, num_workers=0), 0, 1, 4, 0
    )
    x, y = next(loader)
    assert x.shape == (4, 4, 2, 2) and y.dtype == torch.long and (loader.input_channels, loader.input_size) == (4, 2)
    assert torch.equal(x[:, 0, 0, 0].long() % 5, y)


def test_pixel_space_extraction_stores_images_unscaled(image_folder, tmp_path):
    run_extraction(_extract_cfg(image_folder, "none", tmp_path))
    manifest = Manifest.load(str(tmp_path))
    assert manifest.scale_factor == 1.0 and manifest.latent_shape == [3, 16, 16]
    index, mean, std, _ = decode_sample(next(iter(read_shard(str(tmp_path / shard_name(0))))))
    image = ImageFolderDataset(image_folder, 16)[index][0]
    np.testing.assert_allclose(mean[0], image.numpy(), atol=1e-3)
    np.testing.assert_allclose(mean[1], image.flip(-1).numpy(), atol=1e-3)
    assert not std.any()
