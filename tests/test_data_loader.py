"""`DataConfig` validation and the map-style `TrainLoader` (digits, image folders)."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from dit_moe.data import DataConfig, build_codec, build_train_loader
from dit_moe.data.digits import digits_arrays
from dit_moe.data.vae import LatentCodec, PixelCodec

from test_vae import save_tiny_vae


def _take(loader, n):
    return [next(loader) for _ in range(n)]


def test_digits_loader_shapes_and_geometry():
    loader = build_train_loader(DataConfig(image_size=16, channels=1), 0, 1, 8, seed=0)
    x, y = next(loader)
    assert x.shape == (8, 1, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.long
    assert (loader.input_channels, loader.input_size, loader.num_classes, loader.needs_encoding) == (1, 16, 10, False)
    assert isinstance(build_codec(DataConfig()), PixelCodec)


def test_ranks_split_each_epoch_exactly_once():
    x_all, y_all = digits_arrays("all", 8, 1)
    per_rank = 1797 // 2 // 16
    seen = []
    for rank in range(2):
        loader = build_train_loader(DataConfig(image_size=8, channels=1), rank, 2, 16, seed=3)
        batches = _take(loader, per_rank)
        assert loader.epoch == 0
        x = torch.cat([b[0] for b in batches]).numpy()
        # identify each returned sample by its pixels
        rows = {arr.tobytes(): i for i, arr in enumerate(x_all)}
        seen += [rows[arr.tobytes()] for arr in x]
        next(loader)
        assert loader.epoch == 1
    assert len(seen) == len(set(seen)) == 2 * per_rank * 16


def test_determinism_and_epochs_differ():
    cfg = DataConfig(image_size=8)
    a = _take(build_train_loader(cfg, 0, 1, 32, seed=5), 3)
    b = _take(build_train_loader(cfg, 0, 1, 32, seed=5), 3)
    c = _take(build_train_loader(cfg, 0, 1, 32, seed=6), 3)
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b))
    assert not torch.equal(a[0][1], c[0][1])
    loader = build_train_loader(cfg, 0, 1, 32, seed=5)
    first = loader.epoch_batches(0)
    assert not np.array_equal(first, loader.epoch_batches(1))


def test_map_loader_resume_gives_the_same_batches():
    cfg = DataConfig(image_size=8)
    loader = build_train_loader(cfg, 1, 2, 64, seed=0)  # 14 batches per epoch
    _take(loader, 12)
    state = loader.state_dict()
    expected = _take(loader, 5)
    assert loader.epoch == 1
    resumed = build_train_loader(cfg, 1, 2, 64, seed=0)
    resumed.load_state_dict(state)
    assert (resumed.epoch, resumed.batch) == (0, 12)
    for (x, y), (rx, ry) in zip(expected, _take(resumed, 5)):
        assert torch.equal(x, rx) and torch.equal(y, ry)
    with pytest.raises(ValueError, match="same settings"):
        build_train_loader(cfg, 1, 4, 64, seed=0).load_state_dict(state)


def _folder(root, n=4):
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        os.makedirs(root / c, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return str(root)


def test_folder_loader_with_workers_resumes_exactly(tmp_path):
    cfg = DataConfig("folder", data_path=_folder(tmp_path), vae_path="none", image_size=16, num_workers=2)
    loader = build_train_loader(cfg, 0, 1, 3, seed=1)  # 2 batches per epoch
    assert (loader.input_channels, loader.input_size, loader.num_classes, loader.needs_encoding) == (3, 16, 2, False)
    _take(loader, 3)
    state = loader.state_dict()
    expected = _take(loader, 3)
    resumed = build_train_loader(cfg, 0, 1, 3, seed=1)
    resumed.load_state_dict(state)
    for (x, y), (rx, ry) in zip(expected, _take(resumed, 3)):
        assert torch.equal(x, rx) and torch.equal(y, ry)


def test_folder_with_vae_reports_latent_geometry(tmp_path):
    vae = save_tiny_vae(tmp_path / "vae")
    cfg = DataConfig("folder", data_path=_folder(tmp_path / "img"), vae_path=vae, image_size=16, num_workers=0)
    cfg.check()
    loader = build_train_loader(cfg, 0, 1, 2, seed=0)
    assert (loader.input_channels, loader.input_size, loader.needs_encoding) == (4, 8, True)
    codec = build_codec(cfg)
    assert isinstance(codec, LatentCodec)
    x, _ = next(loader)
    assert codec.encode(x).shape == (2, 4, 8, 8)


def test_config_errors_are_one_clear_sentence(tmp_path):
    with pytest.raises(ValueError, match="Unknown dataset"):
        DataConfig("imagenet")
    with pytest.raises(ValueError, match="needs --data-path"):
        DataConfig("folder", vae_path="none")
    with pytest.raises(ValueError, match="needs --vae-path"):
        DataConfig("folder", data_path=str(tmp_path))
    with pytest.raises(ValueError, match="needs --features-path"):
        DataConfig("latents")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        DataConfig("folder", data_path=str(tmp_path / "missing"), vae_path="none").check()
    with pytest.raises(FileNotFoundError, match="no class sub-folders"):
        DataConfig("folder", data_path=str(tmp_path), vae_path="none").check()
    _folder(tmp_path)
    with pytest.raises(FileNotFoundError, match="AutoencoderKL"):
        DataConfig("folder", data_path=str(tmp_path), vae_path=str(tmp_path / "sd-vae-ft-mse")).check()
    with pytest.raises(ValueError, match="fewer than one global batch"):
        build_train_loader(DataConfig("folder", data_path=str(tmp_path), vae_path="none", image_size=8), 0, 4, 4, 0)
    with pytest.raises(ValueError, match="raise --num-classes"):
        build_train_loader(DataConfig(num_classes=5), 0, 1, 4, 0)


def test_auto_dataset_follows_the_paths_given_as_dit_and_dit_moe_command_lines_do(tmp_path):
    assert DataConfig().dataset == "digits"
    assert DataConfig(data_path=str(tmp_path), vae_path="none").dataset == "folder"  # DiT: --data-path images
    assert DataConfig(features_path=str(tmp_path / "shards")).dataset == "latents"
    (tmp_path / "imagenet256_features").mkdir()
    assert DataConfig(features_path=str(tmp_path), num_classes=1000).dataset == "npy"  # fast-DiT's layout
    with pytest.raises(ValueError, match="needs --vae-path"):  # images without a VAE: the folder's error
        DataConfig(data_path=str(tmp_path))
