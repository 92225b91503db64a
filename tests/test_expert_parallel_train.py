"""The trainer with --ep-size 2 on two CPU processes (deepspeed launcher, gloo) against --ep-size 1.

Same weights (every rank builds the full model from the seed, then keeps its experts), same
global batch: losses, gradient norms (expert gradients included, clipped at 1.0) and the
exported weights must match expert parallelism off, under ZeRO-1 and ZeRO-2; a resumed run
must reproduce the uninterrupted one; a checkpoint without its full state refuses another ep size with one sentence.
"""

from pathlib import Path

import pytest
import torch

from dit_moe.checkpoint import load_model

from trainer_runs import losses, records, run_train

pytestmark = pytest.mark.multiproc
RUN = ["--global-batch-size", "4", "--max-steps", "3"]


def assert_same_exports(got_dir, expected_dir, exact=False):
    for prefer_ema in (False, True):
        got = load_model(Path(got_dir) / "export.safetensors", prefer_ema=prefer_ema).state_dict()
        expected = load_model(Path(expected_dir) / "export.safetensors", prefer_ema=prefer_ema).state_dict()
        assert got.keys() == expected.keys()
        for name in got:
            if exact:
                assert torch.equal(got[name], expected[name]), name
            else:
                torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.fixture(scope="module")
def ep1(tmp_path_factory):
    out = tmp_path_factory.mktemp("ep1")
    run_train(out, *RUN, launcher="deepspeed")
    return out


@pytest.fixture(scope="module")
def ep2_zero2(tmp_path_factory):
    out = tmp_path_factory.mktemp("ep2_zero2")
    run_train(out, *RUN, "--ep-size", "2", launcher="deepspeed")
    return out


@pytest.mark.parametrize("zero", ["zero1", "zero2"])
def test_ep2_matches_ep1(ep1, ep2_zero2, tmp_path, zero):
    if zero == "zero2":
        out = ep2_zero2
    else:
        out = tmp_path
        run_train(out, *RUN, "--ep-size", "2", zero=zero, launcher="deepspeed")
    expected, got = records(ep1), records(out)
    assert sorted(got) == [1, 2, 3]
    for step in expected:
        for key in ("loss", "moe_aux_loss", "grad_norm"):
            assert got[step][key] == pytest.approx(expected[step][key], rel=1e-5), (step, key)
        sent, received = got[step]["ep_tokens_sent"], got[step]["ep_tokens_received"]
        assert len(sent) == 2 and sent[0] == received[1] > 0 and sent[1] == received[0] > 0
        assert all(s > 0 for s in got[step]["ep_all_to_all_s"])
        assert "ep_tokens_sent" not in expected[step]
    assert_same_exports(out, ep1)  # gathered on export: the full [E, ...] experts, read on one process


def test_resume_with_ep_reproduces_the_uninterrupted_run(ep2_zero2, tmp_path):
    run_train(tmp_path, "--global-batch-size", "4", "--max-steps", "2", "--ep-size", "2", launcher="deepspeed")
    tag = tmp_path / "checkpoints" / "step0000002"
    assert sorted(p.name for p in tag.glob("experts_ep*")) == ["experts_ep0.safetensors", "experts_ep1.safetensors"]
    run_train(tmp_path, *RUN, "--ep-size", "2", "--resume", "auto", launcher="deepspeed")
    assert losses(tmp_path)[3] == losses(ep2_zero2)[3]
    assert_same_exports(tmp_path, ep2_zero2, exact=True)
    for prefer_ema in (False, True):  # the checkpoint folder itself reads on one process: experts gathered from shards
        from_dir = load_model(tmp_path / "checkpoints", prefer_ema=prefer_ema).state_dict()
        exported = load_model(tmp_path / "export.safetensors", prefer_ema=prefer_ema).state_dict()
        assert from_dir.keys() == exported.keys()
        assert all(torch.equal(from_dir[k], exported[k]) for k in from_dir), prefer_ema

    # Without its full state (--elastic-checkpoints false) a tag resumes on its own shape only: one sentence.
    from dit_moe.checkpoint import layout
    from dit_moe.train import checkpointer

    layout.state_index_file(tag).unlink()
    with pytest.raises(ValueError, match=r"written by 2 process\(es\) with --ep-size 2 under ZeRO-2 .* --ep-size 1"):
        checkpointer.check_reshardable(tag, layout.read_shape(tag), layout.RunShape(1, 1, 2))


def test_zero3_with_ep_is_refused_at_start_up():
    from dit_moe.train import engine as engine_lib

    with pytest.raises(ValueError, match=r"--ep-size 2 works with ZeRO stage 1 or 2 .* not with stage 3"):
        engine_lib.check_expert_parallel(2, {"zero_optimization": {"stage": 3}}, world_size=2)
    with pytest.raises(ValueError, match=r"--ep-size 3 must divide the number of processes \(2\)"):
        engine_lib.check_expert_parallel(3, {"zero_optimization": {"stage": 2}}, world_size=2)
    engine_lib.check_expert_parallel(2, {"zero_optimization": {"stage": 1}}, world_size=4)
