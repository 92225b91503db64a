"""ADM sample-batch format: keys, dtypes, shapes, streaming readability, atomic writes, PNG folder assembly."""

import io
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from dit_moe.evaluation.npz import (
    iter_npz_images,
    npz_from_png_folder,
    png_name,
    read_npz,
    to_uint8_nhwc,
    write_npz,
    write_statistics,
)


def _adm_stream_read(path, name):
    """What guided-diffusion's evaluator does: open `<name>.npy` inside the zip and stream its header + data."""
    with open(path, "rb") as f, zipfile.ZipFile(f) as zf:
        assert f"{name}.npy" in zf.namelist()
        with zf.open(f"{name}.npy") as arr_f:
            assert np.lib.format.read_magic(arr_f) == (1, 0)
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(arr_f)
            assert not fortran and not dtype.hasobject
            data = arr_f.read()
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def test_npz_has_adm_keys_dtype_and_shape(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5])
    path = write_npz(tmp_path / "samples.npz", images, labels)
    with np.load(path) as data:
        assert sorted(data.files) == ["arr_0", "arr_1"]
        assert data["arr_0"].dtype == np.uint8 and data["arr_0"].shape == (5, 8, 8, 3)
        assert data["arr_1"].dtype == np.int64
    np.testing.assert_array_equal(_adm_stream_read(path, "arr_0"), images)
    batch = read_npz(path)
    np.testing.assert_array_equal(batch.images, images)
    np.testing.assert_array_equal(batch.labels, labels)
    assert not list(tmp_path.glob("*.tmp*"))


def test_float_nchw_and_grey_become_uint8_rgb_nhwc(tmp_path):
    x = torch.tensor([-1.0, 0.0, 1.0, 2.0]).view(1, 1, 2, 2)
    expected = np.clip(127.5 * x.numpy() + 128, 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)  # DiT's mapping
    np.testing.assert_array_equal(to_uint8_nhwc(x), expected)
    path = write_npz(tmp_path / "grey.npz", x)
    stored = read_npz(path)
    assert stored.images.shape == (1, 2, 2, 3) and stored.labels is None
    assert (stored.images == expected).all()


def test_failed_write_keeps_previous_file(tmp_path):
    path = write_npz(tmp_path / "s.npz", np.zeros((2, 4, 4, 3), np.uint8), [0, 1])
    with pytest.raises(ValueError, match="labels for 2 images"):
        write_npz(path, np.ones((2, 4, 4, 3), np.uint8), [0, 1, 2])
    assert read_npz(path).images.max() == 0


def test_labels_key_alternative_and_statistics(tmp_path):
    np.savez(tmp_path / "alt.npz", arr_0=np.zeros((2, 4, 4, 3), np.uint8), labels=np.array([7, 8]))
    np.testing.assert_array_equal(read_npz(tmp_path / "alt.npz").labels, [7, 8])
    stats = read_npz(write_statistics(tmp_path / "ref.npz", np.zeros(4), np.eye(4)))
    assert stats.images is None and stats.mu.shape == (4,) and stats.sigma.shape == (4, 4)


def test_rejects_non_uint8_images(tmp_path):
    np.savez(tmp_path / "bad.npz", arr_0=np.zeros((2, 4, 4, 3), np.float32))
    with pytest.raises(ValueError, match="uint8"):
        read_npz(tmp_path / "bad.npz")


def test_png_folder_assembles_in_index_order(tmp_path):
    for i in (2, 0, 1):
        Image.fromarray(np.full((4, 4), 10 * i, np.uint8)).save(tmp_path / png_name(i))
    path = npz_from_png_folder(tmp_path, 3, tmp_path / "out.npz", np.array([5, 6, 7]), progress=False)
    batch = read_npz(path)
    assert batch.images.shape == (3, 4, 4, 3)
    assert list(batch.images[:, 0, 0, 0]) == [0, 10, 20]
    with pytest.raises(FileNotFoundError, match="lacks 1 of 4"):
        npz_from_png_folder(tmp_path, 4, tmp_path / "out.npz", progress=False)


def test_streaming_reader_batches_and_detects_truncation(tmp_path):
    images = np.random.default_rng(1).integers(0, 256, (5, 4, 4, 3), dtype=np.uint8)
    path = write_npz(tmp_path / "s.npz", images)
    batches = list(iter_npz_images(path, 2))
    assert [len(b) for b in batches] == [2, 2, 1]
    np.testing.assert_array_equal(np.concatenate(batches), images)
    assert read_npz(path, load_images=False).num_images == 5
    with zipfile.ZipFile(tmp_path / "cut.npz", "w") as zf:
        zf.writestr("arr_0.npy", _npy_bytes(images)[:-10])
    with pytest.raises(ValueError, match="truncated"):
        list(iter_npz_images(tmp_path / "cut.npz", 2))


def _npy_bytes(array):
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()
