"""Damaged latent shards and fast-DiT .npy files stop the run with one sentence naming the file (policy: stop)."""

import os
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
from test_data_latents import _synthetic_shards

from dit_moe.data import DataConfig, build_train_loader
from dit_moe.data.integrity import DataIntegrityError
from dit_moe.data.shards import shard_name, write_shard

from trainer_runs import run_train


def _npy_folder(root, n=8, num_classes=5):
    """fast-DiT's layout with feature n = full((1, 4, 2, 2), n) and label n % num_classes."""
    for sub in ("imagenet256_features", "imagenet256_labels"):
        os.makedirs(root / sub)
    for i in range(n):
        np.save(root / "imagenet256_features" / f"{i}.npy", np.full((1, 4, 2, 2), i, dtype=np.float32))
        np.save(root / "imagenet256_labels" / f"{i}.npy", np.array([i % num_classes]))
    return n


def _shards_cfg(root, **kw):
    return DataConfig("latents", features_path=str(root), image_size=16, shuffle_buffer=4, **kw)


def _npy_cfg(root, **kw):
    return DataConfig("npy", features_path=str(root), num_classes=5, **kw)


def _truncate(path, keep):
    with open(path, "r+b") as f:
        f.truncate(keep)


def _assert_names(err: pytest.ExceptionInfo, path) -> None:
    """One sentence, naming the damaged file."""
    message = str(err.value)
    assert str(path) in message and "\n" not in message and message.endswith("."), message
    assert "Traceback" not in message and "DataLoader worker" not in message, message


# --- a healthy folder -------------------------------------------------------------------------------


def test_healthy_shards_pass_and_give_every_sample_once_per_epoch(tmp_path):
    n = _synthetic_shards(tmp_path, [5, 5, 5, 4])
    _shards_cfg(tmp_path).check()
    loader = build_train_loader(_shards_cfg(tmp_path, num_workers=2), 0, 1, 1, seed=0)
    seen = [int(next(loader)[0][0, 0, 0, 0].abs()) - 1 for _ in range(n)]  # mean = +-(index + 1), std 0
    assert sorted(seen) == list(range(n)) and loader.epoch == 1


def test_healthy_npy_folder_passes_and_gives_every_sample_once_per_epoch(tmp_path):
    n = _npy_folder(tmp_path)
    _npy_cfg(tmp_path).check()
    loader = build_train_loader(_npy_cfg(tmp_path, num_workers=2), 0, 1, 2, seed=0)
    seen = [int(v) for _ in range(n // 2) for v in next(loader)[0][:, 0, 0, 0]]
    assert sorted(seen) == list(range(n)) and (loader.epoch, loader.batch) == (0, n // 2)


# --- damaged shards -----------------------------------------------------------------------------------


def _cut_inside_a_member(path):
    _truncate(path, os.path.getsize(path) // 2 + 100)


def _cut_at_a_member_boundary(path):
    _truncate(path, 3 * 2048)  # each member is a 512-byte header + one 512-byte data block; keeps sample 0


def _member_of_the_wrong_size(path):
    mean = np.zeros((2, 2, 2, 3))  # the manifest records latents of shape (2, 2, 2)
    write_shard(path, [(i, mean, mean, 0) for i in range(5)])


def _garbage(path):
    with open(path, "wb") as f:
        f.write(np.random.default_rng(0).bytes(3000))


SHARD_DAMAGE = [_cut_inside_a_member, _cut_at_a_member_boundary, _member_of_the_wrong_size, _garbage]


@pytest.mark.parametrize("damage", SHARD_DAMAGE)
def test_damaged_shard_stops_the_start_up_check(tmp_path, damage):
    _synthetic_shards(tmp_path, [5, 5, 5])
    bad = tmp_path / shard_name(1)
    damage(bad)
    with pytest.raises(DataIntegrityError, match="re-extract it") as err:
        _shards_cfg(tmp_path).check()
    _assert_names(err, bad)


@pytest.mark.parametrize("damage", SHARD_DAMAGE)
def test_shard_damaged_after_the_check_stops_the_workers_reading_it(tmp_path, damage):
    n = _synthetic_shards(tmp_path, [5, 5, 5])
    loader = build_train_loader(_shards_cfg(tmp_path, num_workers=2), 0, 1, 1, seed=0)
    bad = tmp_path / shard_name(1)
    damage(bad)
    with pytest.raises(DataIntegrityError, match="re-extract it") as err:
        for _ in range(n):
            next(loader)
    _assert_names(err, bad)


# --- damaged .npy files ---------------------------------------------------------------------------------


def _truncated(path):
    _truncate(path, os.path.getsize(path) - 4)


def _garbage_header(path):
    data = bytearray(path.read_bytes())
    data[10:40] = b"this is not a numpy header!!!!"
    path.write_bytes(bytes(data))


def _pickled_object(path):
    np.save(path, np.array([{"not": "an array"}], dtype=object), allow_pickle=True)


def _pickle_file(path):
    path.write_bytes(pickle.dumps({"not": "an array"}))


NPY_DAMAGE = [_truncated, _garbage_header, _pickled_object, _pickle_file]


@pytest.mark.parametrize("folder", ["imagenet256_features", "imagenet256_labels"])
@pytest.mark.parametrize("damage", NPY_DAMAGE)
def test_damaged_npy_file_stops_the_start_up_check(tmp_path, damage, folder):
    _npy_folder(tmp_path)
    bad = tmp_path / folder / "3.npy"
    damage(bad)
    with pytest.raises(DataIntegrityError, match="delete it") as err:
        _npy_cfg(tmp_path).check()
    _assert_names(err, bad)


def test_npy_file_of_another_shape_or_kind_stops_the_start_up_check(tmp_path):
    _npy_folder(tmp_path)
    bad = tmp_path / "imagenet256_features" / "5.npy"
    np.save(bad, np.zeros((1, 4, 2, 3), dtype=np.float32))
    with pytest.raises(DataIntegrityError, match="must be a float") as err:
        _npy_cfg(tmp_path).check()
    _assert_names(err, bad)
    np.save(bad, np.zeros((1, 4, 2, 2), dtype=np.float32))
    bad = tmp_path / "imagenet256_labels" / "6.npy"
    np.save(bad, np.array([0.5]))
    with pytest.raises(DataIntegrityError, match="not one integer class label") as err:
        _npy_cfg(tmp_path).check()
    _assert_names(err, bad)


@pytest.mark.parametrize("damage", NPY_DAMAGE)
def test_npy_file_damaged_after_the_check_stops_the_workers_reading_it(tmp_path, damage):
    n = _npy_folder(tmp_path)
    loader = build_train_loader(_npy_cfg(tmp_path, num_workers=2), 0, 1, 2, seed=0)
    bad = tmp_path / "imagenet256_features" / "3.npy"
    damage(bad)
    with pytest.raises(DataIntegrityError, match="delete it") as err:
        for _ in range(n // 2):
            next(loader)
    _assert_names(err, bad)


# --- the trainer ------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["latents", "npy"])
def test_trainer_on_a_damaged_folder_exits_2_with_one_line(tmp_path, kind):
    features = tmp_path / "features"
    features.mkdir()
    if kind == "latents":
        _synthetic_shards(features, [5, 5])
        bad, extra = features / shard_name(1), []
        _cut_inside_a_member(bad)
    else:
        _npy_folder(features)
        bad, extra = features / "imagenet256_labels" / "3.npy", ["--num-classes", "5"]
        _truncated(bad)
    stale = _stale_shm_buffer()  # its removal's notice must not join the error line (it goes to the run's log)
    proc = run_train(
        tmp_path / "out",
        "--dataset",
        kind,
        "--features-path",
        str(features),
        "--image-size",
        "16",
        "--max-steps",
        "2",
        "--global-batch-size",
        "2",
        *extra,
        check=False,
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("train_deepspeed.py: error: ") and str(bad) in lines[0], lines[0]
    assert not (tmp_path / "out").exists()
    assert not stale.exists()  # positive control: the start removed it, so a notice was raised


def _stale_shm_buffer() -> Path:
    """A DeepSpeed CPU all-reduce buffer of this user that no process holds, old enough to be removed."""
    from dit_moe.train.distributed import SHM_BUFFER_PREFIX, SHM_DIR, STALE_AFTER_S

    path = SHM_DIR / f"{SHM_BUFFER_PREFIX}{os.getuid()}_127.0.0.1_{os.getpid()}_0"
    path.write_bytes(b"")
    old = time.time() - 2 * STALE_AFTER_S
    os.utime(path, (old, old))
    return path
