"""Elastic resume: a checkpoint taken on one shape (processes, --ep-size, ZeRO stage) continues on another.

Each case runs 4 steps uninterrupted on the first shape, checkpointing at step 2, then resumes that step-2
tag on the second shape to step 4: the losses and grad norms of steps 3-4 and the final weights and EMA
must equal the uninterrupted run's (to 1e-4: the reduction order differs). The global batch 4 with one
micro-step keeps the global micro-batch, so every sample meets the same noise. The load-balancing loss is
off: it is computed over each rank's tokens, which by design depends on the world size.
"""

import shutil

import numpy as np
import pytest
import torch

from dit_moe.checkpoint import load_model
from dit_moe.checkpoint.layout import read_shape
from dit_moe.data.loader import DataInfo, MapTrainLoader
from dit_moe.train.config import BatchPlan, RunSection

from trainer_runs import records, run_train


def trainer_test(test):
    """Marks a test that starts trainer processes."""
    return pytest.mark.multiproc(pytest.mark.slow(test))


RUN = ["--global-batch-size", "4", "--aux-loss-coef", "0", "--ckpt-every", "2"]
TAG = "step0000002"


def _launcher(ranks: int) -> dict:
    return {"launcher": "deepspeed", "ranks": ranks} if ranks > 1 else {}


def _train(out, ranks, *args, zero="zero2"):
    run_train(out, *RUN, *args, zero=zero, **_launcher(ranks))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Runs of 4 steps on a (ranks, zero, ep) shape, each run once per module."""
    done = {}

    def get(ranks, zero="zero2", ep=1):
        key = (ranks, zero, ep)
        if key not in done:
            done[key] = tmp_path_factory.mktemp(f"full_{ranks}_{zero}_ep{ep}")
            _train(done[key], ranks, "--max-steps", "4", "--ep-size", str(ep), zero=zero)
        return done[key]

    return get


def assert_same_continuation(resumed, expected):
    got, want = records(resumed), records(expected)
    assert sorted(got) == [3, 4]
    for step in (3, 4):
        for key in ("loss", "grad_norm"):
            assert got[step][key] == pytest.approx(want[step][key], rel=1e-4), (step, key)
    for prefer_ema in (False, True):
        a = load_model(resumed / "export.safetensors", prefer_ema=prefer_ema).state_dict()
        b = load_model(expected / "export.safetensors", prefer_ema=prefer_ema).state_dict()
        assert a.keys() == b.keys()
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6, msg=f"{name} ema={prefer_ema}")


def resume_on(source, tmp_path, ranks, zero="zero2", ep=1):
    shutil.copytree(source / "checkpoints" / TAG, tmp_path / "checkpoints" / TAG)
    _train(tmp_path, ranks, "--max-steps", "4", "--ep-size", str(ep), "--resume", "auto", zero=zero)
    return tmp_path


@trainer_test
@pytest.mark.parametrize(
    "zero, before, after", [("zero2", 2, 1), ("zero2", 1, 2), ("zero3", 2, 1), ("zero3", 1, 2), ("zero1", 2, 1)]
)
def test_resume_on_another_number_of_processes(uninterrupted, tmp_path, zero, before, after):
    source = uninterrupted(before, zero)
    assert read_shape(source / "checkpoints" / TAG).world_size == before
    assert_same_continuation(resume_on(source, tmp_path, after, zero), source)


@trainer_test
@pytest.mark.parametrize("before, after", [("zero2", "zero3"), ("zero3", "zero1")])
def test_resume_under_another_zero_stage(uninterrupted, tmp_path, before, after):
    source = uninterrupted(2, before)
    assert_same_continuation(resume_on(source, tmp_path, 2, after), source)


@trainer_test
def test_resume_on_four_processes(uninterrupted, tmp_path):
    source = uninterrupted(2, "zero2")
    assert_same_continuation(resume_on(source, tmp_path, 4, "zero2"), source)


@trainer_test
@pytest.mark.parametrize("before, after", [((2, 2), (1, 1)), ((1, 1), (2, 2))])
def test_resume_on_another_ep_size(uninterrupted, tmp_path, before, after):
    source = uninterrupted(before[0], ep=before[1])
    assert_same_continuation(resume_on(source, tmp_path, after[0], ep=after[1]), source)


@trainer_test
def test_resume_ep2_dp2_on_two_processes(uninterrupted, tmp_path):
    source = uninterrupted(4, ep=2)
    assert_same_continuation(resume_on(source, tmp_path, 2, ep=2), source)


def _as_written_before_sharding(tag):
    """Rewrite a tag as dit-moe wrote it before the sharded state: one `full_state.safetensors` of whole
    tensors (prefixed fp32/, moment names, frozen/) with its JSON header, DeepSpeed's per-rank files aside."""
    import json
    from contextlib import ExitStack

    from safetensors.torch import save_file

    from dit_moe.checkpoint import layout
    from dit_moe.train import reshard

    index = reshard.read_index(tag)
    with ExitStack() as stack:
        reader = reshard.RangeReader(tag, index, stack)
        tensors = {key: reader.read(key, 0, int(np.prod(shape))).view(shape) for key, shape in reader.shapes.items()}
    save_file(tensors, str(layout.full_state_file(tag)), metadata={reshard.META_KEY: json.dumps(index["meta"])})
    for path in [*tag.glob("state_rank*.safetensors"), layout.state_index_file(tag)]:
        path.unlink()


@trainer_test
def test_a_tag_written_before_the_sharded_state_still_resumes_on_another_shape(uninterrupted, tmp_path):
    source = uninterrupted(1, "zero2")
    shutil.copytree(source / "checkpoints" / TAG, tmp_path / "checkpoints" / TAG)
    _as_written_before_sharding(tmp_path / "checkpoints" / TAG)
    _train(tmp_path, 2, "--max-steps", "4", "--resume", "auto")
    assert_same_continuation(tmp_path, source)


def _composition(tag, ranks, zero, ep):
    """The free-space estimate's view of a tag, from the model its dit_config.json builds."""
    import json

    from dit_moe.models import DiT, DiTConfig
    from dit_moe.train.disk import TagComposition

    model = DiT(DiTConfig.from_dict(json.loads((tag / "dit_config.json").read_text())))
    params = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for name, p in model.named_parameters() if ".moe.experts." in name)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    stage = int(zero[-1])
    return TagComposition(params, experts if ep > 1 else 0, frozen, 4, stage, ep, ranks, True)


@trainer_test
@pytest.mark.parametrize("ranks, zero, ep", [(1, "zero2", 1), (2, "zero3", 1), (2, "zero2", 2)])
def test_free_space_estimate_is_within_ten_percent_of_a_written_tag(uninterrupted, ranks, zero, ep):
    from dit_moe.train.disk import size_on_disk

    tag = uninterrupted(ranks, zero, ep) / "checkpoints" / TAG
    estimate, measured = _composition(tag, ranks, zero, ep).estimated_bytes(), size_on_disk(tag)
    assert abs(estimate - measured) <= 0.1 * measured, (estimate, measured)


class _Ids(torch.utils.data.Dataset):
    """Sample i is the number i, so batches show which samples they hold."""

    def __len__(self):
        return 50

    def __getitem__(self, i):
        return torch.tensor(float(i)), i


def _loaders(world_size, micro, global_batch):
    info = DataInfo(1, 1, 1, False, 50)
    return [
        MapTrainLoader(_Ids(), info, r, world_size, micro, seed=3, global_batch=global_batch) for r in range(world_size)
    ]


def _steps(loaders, steps, accum):
    """Sample ids per optimizer step, in global order (rank r holds positions r, r + W, ...)."""
    out = []
    for _ in range(steps):
        step = []
        for _ in range(accum):
            parts = [next(loader)[1] for loader in loaders]
            step += torch.stack(parts, dim=1).reshape(-1).tolist()
        out.append(step)
    return out


@pytest.mark.parametrize("world_after, micro_after, accum_after", [(1, 8, 1), (4, 2, 1), (2, 2, 2)])
def test_epoch_ids_once_each_across_an_elastic_resume(world_after, micro_after, accum_after):
    first = _loaders(2, 4, 8)  # global batch 8 = 2 ranks x 4: an epoch is 6 steps, 48 of the 50 samples
    before = _steps(first, 2, 1)
    state = first[0].state_dict()
    assert state == first[1].state_dict() and state["samples"] == 16
    resumed = _loaders(world_after, micro_after, 8)
    for loader in resumed:
        loader.load_state_dict(state)
    after = _steps(resumed, 4, accum_after)
    ids = [i for step in before + after for i in step]
    order = np.random.default_rng([3, 0]).permutation(50)[:48].tolist()
    assert ids == order  # the uninterrupted epoch, sample by sample: none repeated, none skipped
    assert (
        resumed[0].epoch == 0
        and _steps(resumed, 1, accum_after)[0][0] == np.random.default_rng([3, 1]).permutation(50)[0]
    )


def test_batch_plan_for_resume_keeps_the_global_batch():
    run = RunSection()
    assert BatchPlan.for_resume(run, 1, 8, 1) == BatchPlan(8, 1, 1)  # the accumulation kept: same micro-batches
    assert BatchPlan.for_resume(run, 4, 8, 2) == BatchPlan(1, 2, 4)
    assert BatchPlan.for_resume(run, 8, 8, 2) == BatchPlan(1, 1, 8)  # 8 ranks: micro-batches of 8
    assert BatchPlan.for_resume(run, 2, 12, 4) == BatchPlan(1, 6, 2)  # 12 / 2 = 6: the next accumulation dividing
    assert BatchPlan.for_resume(RunSection(micro_batch_size=2), 1, 8, 1) == BatchPlan(2, 4, 1)
    with pytest.raises(ValueError, match="global batch 8 cannot be split over 3 processes"):
        BatchPlan.for_resume(run, 3, 8, 1)
    with pytest.raises(ValueError, match="continues global batch 8, not --global-batch-size 16"):
        BatchPlan.for_resume(RunSection(global_batch_size=16), 2, 8, 1)


def test_positions_saved_per_rank_before_still_resume():
    old = {"kind": "map", "epoch": 0, "batch": 2, "seed": 3, "world_size": 2, "micro_batch_size": 4, "num_samples": 50}
    resumed = _loaders(2, 4, 8)
    for loader in resumed:
        loader.load_state_dict(old)
    assert resumed[0].state_dict()["samples"] == 16 and resumed[0].batch == 2
