"""Image preprocessing, the image-folder dataset and the built-in digits."""

import os
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from dit_moe.data.digits import DigitsDataset, digits_arrays
from dit_moe.data.folder import ImageFolderDataset
from dit_moe.data.transforms import center_crop_arr, hflip, to_tensor


def _rgb(arr):
    return Image.fromarray(np.ascontiguousarray(arr, dtype=np.uint8))


def test_center_crop_box_halving_is_2x2_mean():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (64, 64, 3))
    out = center_crop_arr(_rgb(arr), 32)
    expected = arr.reshape(32, 2, 32, 2, 3).mean(axis=(1, 3))
    assert out.shape == (32, 32, 3)
    assert np.abs(out.astype(float) - expected).max() <= 1  # PIL rounds in fixed point


def test_center_crop_takes_the_centre_of_a_wide_image():
    arr = np.arange(48 * 16 * 3).reshape(16, 48, 3) % 251
    out = center_crop_arr(_rgb(arr), 16)
    np.testing.assert_array_equal(out, arr[:, 16:32])


def test_center_crop_resizes_short_side_then_crops_tall_image():
    arr = np.zeros((200, 50, 3), dtype=np.uint8)  # tall: short side is the width
    arr[:100] = 255  # top half bright, bottom half dark
    out = center_crop_arr(_rgb(arr), 10)  # 50 -> 25 (BOX), then 25x100 -> 10x40 bicubic, crop rows 15..25
    assert out.shape == (10, 10, 3)
    assert out[:4].min() > 200 and out[-4:].max() < 50


def test_to_tensor_range_and_hflip():
    arr = np.zeros((4, 6, 3), dtype=np.uint8)
    arr[:, 0] = 255  # bright left column
    x = to_tensor(arr)
    assert x.shape == (3, 4, 6) and x.min() == -1 and x.max() == 1
    assert (x[:, :, 0] == 1).all() and (hflip(x)[:, :, -1] == 1).all() and (hflip(x)[:, :, 0] == -1).all()


def _write_images(root, per_class=3, size=(40, 24)):
    for c, name in enumerate(["zebra", "ant"]):
        os.makedirs(root / name, exist_ok=True)
        for i in range(per_class):
            arr = np.zeros((size[1], size[0], 3), dtype=np.uint8)
            arr[:, : size[0] // 4] = 50 + 60 * c + i  # asymmetric: bright stripe on the left
            _rgb(arr).save(root / name / f"{i}.png")


def test_folder_classes_sorted_and_crop_flip(tmp_path):
    _write_images(tmp_path)
    ds = ImageFolderDataset(str(tmp_path), 16, random_flip=True, seed=3)
    assert ds.classes == ["ant", "zebra"] and len(ds) == 6
    assert [label for _, label in ds.samples] == [0, 0, 0, 1, 1, 1]
    plain = ImageFolderDataset(str(tmp_path), 16)
    flips = []
    for epoch in range(8):
        ds.set_epoch(epoch)
        x, y = ds[0]
        x0, _ = plain[0]
        assert x.shape == (3, 16, 16) and -1 <= x.min() and x.max() <= 1
        assert torch.equal(x, x0) or torch.equal(x, hflip(x0))
        flips.append(not torch.equal(x, x0))
        assert torch.equal(ds[0][0], x)  # same (seed, epoch, index) -> same flip
    assert 0 < sum(flips) < 8


def test_folder_skips_corrupt_files_with_one_warning(tmp_path):
    _write_images(tmp_path)
    good = tmp_path / "ant" / "good.jpg"
    _rgb(np.random.default_rng(0).integers(0, 256, (64, 64, 3))).save(good, quality=95)
    data = good.read_bytes()
    (tmp_path / "ant" / "truncated.jpg").write_bytes(data[: len(data) // 2])
    png = (tmp_path / "ant" / "0.png").read_bytes()
    (tmp_path / "zebra" / "truncated.png").write_bytes(png[: len(png) - 20])
    (tmp_path / "zebra" / "notes.png").write_text("not an image")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = ImageFolderDataset(str(tmp_path), 16)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "Skipped 3" in message
    for name in ("truncated.jpg", "truncated.png", "notes.png"):
        assert name in message
    assert len(ds) == 7 and len(ds.skipped) == 3
    assert all(ds[i][0].shape == (3, 16, 16) for i in range(len(ds)))


def test_folder_missing_or_empty_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageFolderDataset(str(tmp_path / "nope"), 16)
    with pytest.raises(FileNotFoundError, match="no class sub-folders"):
        ImageFolderDataset(str(tmp_path), 16)
    os.makedirs(tmp_path / "cat")
    (tmp_path / "cat" / "readme.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="no readable images"):
        ImageFolderDataset(str(tmp_path), 16)


def test_digits_counts_range_and_split():
    x, y = digits_arrays("all", 32, 3)
    assert x.shape == (1797, 3, 32, 32) and x.dtype == np.float32
    assert x.min() == -1 and x.max() == 1 and np.array_equal(x[:, 0], x[:, 2])
    assert sorted(set(y.tolist())) == list(range(10))
    train_x, train_y = digits_arrays("train", 16, 1)
    test_x, test_y = digits_arrays("test", 16, 1)
    assert train_x.shape[1:] == (1, 16, 16) and len(train_y) + len(test_y) == 1797
    assert np.array_equal(digits_arrays("test", 16, 1)[1], test_y)  # fixed split
    assert len(set(np.bincount(test_y).tolist())) <= 3  # stratified: ~36 per class
    ds = DigitsDataset()
    assert len(ds) == 1797 and ds.num_classes == 10 and ds[0][0].shape == (3, 32, 32)


def test_digits_upsampling_keeps_the_digit():
    from sklearn.datasets import load_digits

    x, _ = digits_arrays("all", 8, 1)
    np.testing.assert_allclose(x[:, 0], load_digits().images / 8 - 1, atol=1e-6)
