"""The start-up data check at cluster scale: shares per rank, cached verdicts, --check-data, agreement across ranks."""

import os

import numpy as np
import pytest
import torch.distributed as dist
import torch.multiprocessing as mp
from test_data_integrity import _cut_inside_a_member, _npy_cfg, _npy_folder, _shards_cfg, _truncated
from test_data_latents import _synthetic_shards

from dit_moe.data import build_train_loader
from dit_moe.data.check import check_features
from dit_moe.data.integrity import DataIntegrityError
from dit_moe.data.shards import Manifest, shard_name
from dit_moe.train.config import load_config

from trainer_runs import run_train


def _count_shard_reads(monkeypatch) -> list:
    """The shard indices `Manifest.check_shard` reads from now on (it still checks them)."""
    reads = []
    original = Manifest.check_shard

    def counting(self, path, shard):
        reads.append(shard)
        return original(self, path, shard)

    monkeypatch.setattr(Manifest, "check_shard", counting)
    return reads


def test_each_rank_checks_only_its_share_of_the_shards(tmp_path, monkeypatch):
    _synthetic_shards(tmp_path, [2] * 7)
    reads = _count_shard_reads(monkeypatch)
    shares = []
    for rank in range(3):
        reads.clear()
        summary = check_features(_shards_cfg(tmp_path, check_data="full"), rank, 3)
        shares.append(sorted(reads))
        assert summary.files == summary.checked == len(reads)
    assert shares == [[0, 3, 6], [1, 4], [2, 5]]


def test_a_damaged_shard_is_found_by_the_rank_whose_share_holds_it(tmp_path):
    _synthetic_shards(tmp_path, [2] * 4)
    _cut_inside_a_member(tmp_path / shard_name(3))
    check_features(_shards_cfg(tmp_path), 0, 2)  # shards 0 and 2: healthy
    with pytest.raises(DataIntegrityError, match=shard_name(3)):
        check_features(_shards_cfg(tmp_path), 1, 2)


def test_second_start_reads_no_unchanged_shard_and_full_reads_them_all(tmp_path, monkeypatch):
    _synthetic_shards(tmp_path, [2] * 5)
    reads = _count_shard_reads(monkeypatch)
    first = check_features(_shards_cfg(tmp_path))
    second = check_features(_shards_cfg(tmp_path))
    assert (first.checked, second.checked, second.cached) == (5, 0, 5) and len(reads) == 5
    assert check_features(_shards_cfg(tmp_path, check_data="full")).checked == 5 and len(reads) == 10


def test_a_shard_changed_since_it_passed_is_checked_again_and_caught(tmp_path):
    _synthetic_shards(tmp_path, [2] * 3)
    check_features(_shards_cfg(tmp_path))
    path = tmp_path / shard_name(1)
    data = bytearray(path.read_bytes())
    data[:100] = bytes(100)  # same size, garbled first tar header, newer mtime
    path.write_bytes(bytes(data))
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 10**9))
    with pytest.raises(DataIntegrityError, match=shard_name(1)):
        check_features(_shards_cfg(tmp_path))


def test_a_new_manifest_invalidates_every_verdict(tmp_path, monkeypatch):
    _synthetic_shards(tmp_path, [2] * 3)
    check_features(_shards_cfg(tmp_path))
    manifest = Manifest.load(str(tmp_path))
    os.utime(tmp_path / "manifest.json", ns=(0, 10**9))  # a re-extraction rewrites it
    manifest.save(str(tmp_path))
    reads = _count_shard_reads(monkeypatch)
    assert check_features(_shards_cfg(tmp_path)).checked == 3 and len(reads) == 3


def test_a_verdict_written_under_another_launch_shape_still_counts(tmp_path, monkeypatch):
    _synthetic_shards(tmp_path, [2] * 4)
    for rank in range(4):
        check_features(_shards_cfg(tmp_path), rank, 4)
    reads = _count_shard_reads(monkeypatch)
    summary = check_features(_shards_cfg(tmp_path), 0, 2)
    assert (summary.checked, summary.cached, reads) == (0, 2, [])


def test_check_data_off_skips_the_start_up_check_but_training_still_stops_on_the_damaged_shard(tmp_path):
    _synthetic_shards(tmp_path, [5, 5])
    _cut_inside_a_member(tmp_path / shard_name(1))
    assert check_features(_shards_cfg(tmp_path, check_data="off")).files == 0
    loader = build_train_loader(_shards_cfg(tmp_path, num_workers=0, check_data="off"), 0, 1, 1, seed=0)
    with pytest.raises(DataIntegrityError, match=shard_name(1)):
        for _ in range(20):
            next(loader)


def test_npy_shares_and_cache(tmp_path):
    n = _npy_folder(tmp_path)
    summaries = [check_features(_npy_cfg(tmp_path), rank, 3) for rank in range(3)]
    assert sum(s.files for s in summaries) == 2 * n and all(s.cached == 0 for s in summaries)
    again = [check_features(_npy_cfg(tmp_path), rank, 3) for rank in range(3)]
    assert sum(s.cached for s in again) == 2 * n and all(s.checked == 0 for s in again)
    _truncated(tmp_path / "imagenet256_labels" / "4.npy")  # rank 1's share (4 = 1 + 3)
    check_features(_npy_cfg(tmp_path), 0, 3)
    with pytest.raises(DataIntegrityError, match="4.npy"):
        check_features(_npy_cfg(tmp_path), 1, 3)


def test_check_data_flag_reaches_the_data_config():
    assert load_config(["--check-data", "off"]).data.check_data == "off"
    assert load_config([]).data.check_data == "cached"
    with pytest.raises(ValueError, match="--check-data"):
        load_config(["--check-data", "sometimes"])


def _agree(rank: int, world: int, store: str, root: str, errors) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        check_features(_shards_cfg(root), rank, world)
        errors.put((rank, None))
    except DataIntegrityError as err:
        errors.put((rank, str(err)))
    finally:
        dist.destroy_process_group()


@pytest.mark.multiproc
def test_every_rank_stops_with_the_sentence_of_the_rank_that_found_the_bad_file(tmp_path):
    root = tmp_path / "features"
    root.mkdir()
    _synthetic_shards(root, [2] * 4)
    _cut_inside_a_member(root / shard_name(2))  # rank 0's share
    errors = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(
        _agree, args=(2, str(tmp_path / "store"), str(root), errors), nprocs=2, start_method="spawn", join=True
    )
    found = dict(errors.get() for _ in range(2))
    assert found[0] == found[1] and shard_name(2) in found[0], found


def test_the_cache_lives_beside_the_data_and_a_read_only_folder_gets_none(tmp_path, monkeypatch):
    _synthetic_shards(tmp_path, [2] * 2)
    check_features(_shards_cfg(tmp_path))
    assert (tmp_path / ".dit_moe_checked" / "rank-00000-of-00001.json").is_file()
    other = tmp_path / "other"
    other.mkdir()
    _synthetic_shards(other, [2] * 2)
    monkeypatch.setattr("dit_moe.data.verdicts.write_text", _read_only)
    assert check_features(_shards_cfg(other)).checked == 2
    assert not list((other / ".dit_moe_checked").glob("*.json"))
    assert np.isfinite(check_features(_shards_cfg(other)).seconds)


def _read_only(path, text):
    raise PermissionError(13, "Read-only file system", str(path))


@pytest.mark.multiproc
def test_two_rank_trainer_stops_on_both_ranks_when_one_share_holds_a_damaged_shard(tmp_path):
    features = tmp_path / "features"
    features.mkdir()
    _synthetic_shards(features, [5] * 4)
    _cut_inside_a_member(features / shard_name(3))  # rank 1's share
    args = ["--dataset", "latents", "--features-path", str(features), "--image-size", "16", "--max-steps", "1"]
    proc = run_train(tmp_path / "out", *args, "--global-batch-size", "2", launcher="deepspeed", check=False)
    sentence = [line for line in proc.stderr.splitlines() if "train_deepspeed.py: error: " in line]
    # every rank stops (the launcher's status is theirs); one line per run, from the first rank that failed
    assert proc.returncode == 2 and len(sentence) == 1 and shard_name(3) in sentence[0], proc.stderr[-3000:]
    assert not (tmp_path / "out").exists()
