"""The checkpointer's pieces that need no trainer process: the private DeepSpeed names checked at start-up,
the free-space estimate against a real tag's size, and the sharded state's range reader."""

import json
from contextlib import ExitStack
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from dit_moe.utils.errors import CheckpointError, UserError


def test_every_private_deepspeed_name_is_present_in_the_tested_version():
    import deepspeed

    from dit_moe.train import engine as engine_lib

    assert deepspeed.__version__ == engine_lib.TESTED_DEEPSPEED
    engine_lib.check_deepspeed_names()


def test_a_missing_private_deepspeed_name_stops_with_one_sentence_naming_the_tested_version(monkeypatch):
    from deepspeed.utils import groups

    from dit_moe.train import engine as engine_lib

    monkeypatch.delattr(groups, "_get_expert_data_parallel_rank")
    with pytest.raises(UserError) as err:
        engine_lib.check_deepspeed_names()
    message = str(err.value)
    assert "deepspeed.utils.groups._get_expert_data_parallel_rank" in message
    assert f"tested with DeepSpeed {engine_lib.TESTED_DEEPSPEED}" in message and "\n" not in message


def test_instance_names_are_checked_on_the_run_s_objects():
    from dit_moe.train import engine as engine_lib

    param = torch.nn.Parameter(torch.zeros(2))
    engine = SimpleNamespace(
        module=SimpleNamespace(parameters=lambda: iter([param])),
        zero_optimization_stage=lambda: 2,
        optimizer=SimpleNamespace(optimizer=None),
        checkpoint_engine=None,
        save_zero_checkpoint=True,
        has_moe_layers=False,
        global_samples=0,
        skipped_steps=0,
    )
    with pytest.raises(UserError, match=r"has no zero-1/2 parameter\._hp_mapping"):
        engine_lib.check_deepspeed_names(engine)
    param._hp_mapping = None
    engine_lib.check_deepspeed_names(engine)


def _state_files(tmp_path, run_id="abc"):
    """Two ranks' fragments of one 2x5 tensor (elements 0-6 and 7-9) and their index."""
    whole = torch.arange(10, dtype=torch.float32)
    save_file({"fp32/w": whole[:7].clone()}, str(tmp_path / "state_rank0.safetensors"), metadata={"run_id": "abc"})
    save_file({"fp32/w": whole[7:].clone()}, str(tmp_path / "state_rank1.safetensors"), metadata={"run_id": run_id})
    index = {
        "run_id": "abc",
        "shapes": {"fp32/w": [2, 5]},
        "files": {"state_rank0.safetensors": {"fp32/w": [0, 7]}, "state_rank1.safetensors": {"fp32/w": [7, 3]}},
    }
    (tmp_path / "state_index.json").write_text(json.dumps(index))
    return whole, index


def test_range_reader_reads_any_range_across_rank_files(tmp_path):
    from dit_moe.train.reshard import RangeReader

    whole, index = _state_files(tmp_path)
    with ExitStack() as stack:
        reader = RangeReader(tmp_path, index, stack)
        for start, numel in ((0, 10), (5, 4), (8, 2), (0, 3)):
            assert torch.equal(reader.read("fp32/w", start, numel), whole[start : start + numel])
        with pytest.raises(CheckpointError, match="holds 0 of the 2 elements of fp32/v"):
            reader.read("fp32/v", 0, 2)
    with ExitStack() as stack:
        reader = RangeReader(tmp_path, index, stack)
        reader.read("fp32/w", 8, 2)
        assert set(reader.handles) == {"state_rank1.safetensors"}  # only the file that holds the range


def test_a_missing_rank_file_or_one_of_another_run_is_refused_naming_it(tmp_path):
    from dit_moe.train.reshard import RangeReader

    _, index = _state_files(tmp_path, run_id="other")
    with pytest.raises(CheckpointError, match=r"state_rank1.safetensors belongs to another run \(run id other"):
        RangeReader(tmp_path, index, ExitStack())
    (tmp_path / "state_rank1.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"is missing state_rank1.safetensors, one rank's part"):
        RangeReader(tmp_path, index, ExitStack())


def _write_sharded_export(path, model, ema, max_bytes):
    """An export written the way the checkpointer writes a large one: planned shards, then the index."""
    from dit_moe.checkpoint import export

    tensors = {f"model.{k}": v for k, v in model.state_dict().items()} | {
        f"ema.{k}": v for k, v in ema.state_dict().items()
    }
    shards = export.plan_shards(path, {k: tuple(v.shape) for k, v in tensors.items()}, max_bytes)
    metadata = export.export_metadata(model.config, None)
    for file, names in shards.items():
        export.write_shard(path.parent / file, {name: tensors[name] for name in names}, metadata)
    return shards, export.write_index(path, shards, sum(4 * v.numel() for v in tensors.values()), metadata)


def test_a_sharded_export_follows_huggingface_names_and_loads_like_one_file(tmp_path):
    from huggingface_hub import constants

    from dit_moe.checkpoint import load_model, save_export

    from tiny_dit import tiny_model

    model, ema = tiny_model(num_experts=4), tiny_model(num_experts=4)
    single = save_export(tmp_path / "one" / "export.safetensors", model.config, model.state_dict(), ema.state_dict())
    path = tmp_path / "sharded" / "export.safetensors"
    path.parent.mkdir()
    shards, index = _write_sharded_export(path, model, ema, max_bytes=200_000)
    assert len(shards) > 2 and sorted(p.name for p in path.parent.glob("export-*-of-*.safetensors")) == sorted(shards)
    assert index.name == constants.SAFETENSORS_INDEX_FILE.replace("model", "export")  # export.safetensors.index.json
    assert not path.exists()
    for prefer_ema in (True, False):
        want = load_model(single, prefer_ema=prefer_ema).state_dict()
        for name in (path, index):  # by the export's usual name or by its index
            got = load_model(name, prefer_ema=prefer_ema)
            assert got.config == model.config
            assert all(torch.equal(got.state_dict()[k], want[k]) for k in want)


def test_a_sharded_export_missing_a_shard_is_refused_naming_it(tmp_path):
    from dit_moe.checkpoint import load_model

    from tiny_dit import tiny_model

    model = tiny_model(num_experts=4)
    shards, _ = _write_sharded_export(tmp_path / "export.safetensors", model, model, max_bytes=200_000)
    missing = sorted(shards)[1]
    (tmp_path / missing).unlink()
    with pytest.raises(CheckpointError, match=f"names the shard {missing}, which is missing"):
        load_model(tmp_path / "export.safetensors")


def test_ema_warmup_ramp_follows_the_num_updates_formula():
    from dit_moe.train.engine import ema_decay_at

    for step in (0, 1, 80, 499, 89_990):
        assert ema_decay_at(step, 0.9999, 100_000) == pytest.approx((1 + step) / (10 + step))
    assert ema_decay_at(100_000, 0.9999, 100_000) == 0.9999
    assert ema_decay_at(200_000, 0.9999, 100_000) == 0.9999
    assert ema_decay_at(5, 0.9999, 0) == 0.9999  # --ema-warmup-steps 0: DiT's constant decay
    assert ema_decay_at(5_000, 0.995, 100_000) == 0.995  # the ramp never exceeds --ema-decay
    # after a 500-step run the EMA holds ~no weight of the initialisation: prod of the decays
    weight_of_init = float(torch.prod(torch.tensor([ema_decay_at(s, 0.995, 100_000) for s in range(500)])))
    assert weight_of_init < 1e-3


@pytest.mark.slow
def test_kill_during_a_state_shard_write_keeps_the_previous_tag_and_resume_continues(tmp_path):
    import sys

    from trainer_runs import losses, run_in_repo, run_train, train_cmd

    args = ("--global-batch-size", "4", "--ckpt-every", "2", "--max-steps", "4", "--aux-loss-coef", "0")
    reference, out = tmp_path / "reference", tmp_path / "run"
    run_train(reference, *args)
    cmd = [sys.executable, "tests/kill_mid_write.py", "step0000004/", *train_cmd(out, *args)[1:]]
    proc = run_in_repo(cmd, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    checkpoints = out / "checkpoints"
    assert (checkpoints / "latest").read_text() == "step0000002"
    assert not (checkpoints / "step0000004" / "COMPLETE").exists()
    half = [p for p in (checkpoints / "step0000004").iterdir() if p.name.startswith(".state_rank0")]
    assert half and half[0].stat().st_size > 8  # the kill landed inside the write: a header and a tensor
    run_train(out, *args, "--resume", "auto")
    assert losses(out) == losses(reference)


def test_a_streamed_safetensors_file_reads_back_as_save_file_writes_it(tmp_path):
    from safetensors.torch import load_file

    from dit_moe.utils.safetensors_stream import write_streamed

    tensors = {"a": torch.randn(3, 5), "b.c": torch.randn(7), "d": torch.randn(2, 2, 2).bfloat16()}
    specs = {name: (tuple(t.shape), t.dtype) for name, t in tensors.items()}
    write_streamed(tmp_path / "s.safetensors", specs, iter(tensors.items()), {"k": "v"})
    back = load_file(str(tmp_path / "s.safetensors"))
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors)
    consumed = []

    def gathered():  # a collective: must be drained even when the file cannot be opened
        for item in tensors.items():
            consumed.append(item[0])
            yield item

    with pytest.raises(OSError):
        write_streamed(tmp_path / "missing" / "s.safetensors", specs, gathered())
    assert consumed == list(tensors)


@pytest.mark.slow
@pytest.mark.multiproc
def test_zero1_bf16_fp32_accumulation_with_sigmoid_bias_router_resumes_exactly(tmp_path):
    """DeepSpeed's BF16_Optimizer (ZeRO-1, bf16 weights, fp32 gradient accumulation), gradient accumulation 2,
    the sigmoid-bias router's buffers: a resume on the same 2 ranks and on 1 rank continues exactly. The
    2-rank run's export is HF-sharded (gathered one tensor at a time to rank 0) and loads like one file; its
    last tag, missing a rank's state file or holding one of another run, is refused naming the file."""
    import shutil

    from dit_moe.checkpoint import load_model
    from dit_moe.utils.errors import EXIT_USER_ERROR

    from trainer_runs import records, run_train

    args = ("--global-batch-size", "8", "--grad-accum-steps", "2", "--ckpt-every", "2", "--aux-loss-coef", "0")
    args += ("--precision", "bf16", "--router", "sigmoid-bias", "--max-steps", "4")
    full, resumed, one = tmp_path / "full", tmp_path / "resumed", tmp_path / "one"
    run_train(full, *args, "--export-shard-bytes", "300000", zero="zero1_bf16_fp32_accum", launcher="deepspeed")
    assert len(list(full.glob("export-*-of-*.safetensors"))) > 2 and not (full / "export.safetensors").exists()
    tag = full / "checkpoints" / "step0000002"
    assert sorted(p.name for p in tag.glob("state_rank*")) == ["state_rank0.safetensors", "state_rank1.safetensors"]
    for out, ranks in ((resumed, 2), (one, 1)):
        shutil.copytree(tag, out / "checkpoints" / tag.name)
        launcher = {"launcher": "deepspeed"} if ranks > 1 else {}
        run_train(out, *args, "--resume", "auto", zero="zero1_bf16_fp32_accum", **launcher)
    want = records(full)
    for out in (resumed, one):
        got = records(out)
        assert sorted(got) == [3, 4]
        for step in (3, 4):
            assert got[step]["loss"] == pytest.approx(want[step]["loss"], rel=1e-4), (out.name, step)
    b = load_model(full / "export.safetensors").state_dict()  # by the usual name: its shards and index
    a = load_model(resumed / "export.safetensors").state_dict()
    bias = [k for k in a if k.endswith("expert_bias")]
    assert bias and any(a[k].abs().sum() > 0 for k in bias)  # the router's buffers moved and came back
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6, msg=name)
    # On 1 rank the bf16 forward and backward run on micro-batches of 4 instead of 2, so gradients round
    # differently and Adam turns that into updates that differ by ~1.5% (measured) of steps 3-4's update; a
    # lost moment or master fragment would change the update itself.
    a = load_model(one / "export.safetensors").state_dict()
    start = load_model(tag, prefer_ema=False).state_dict()  # the bf16 weights at step 2
    names = [k for k in b if b[k].is_floating_point()]
    update = torch.cat([(b[k] - start[k].float()).flatten() for k in names]).norm()
    assert torch.cat([(a[k] - b[k]).flatten() for k in names]).norm() < 0.05 * update

    last, broken = "step0000004", tmp_path / "broken"
    shutil.copytree(full / "checkpoints" / last, broken / "checkpoints" / last)
    rank_file = broken / "checkpoints" / last / "state_rank1.safetensors"
    shutil.copy(resumed / "checkpoints" / last / rank_file.name, rank_file)  # same step, another run
    for refusal in ("belongs to another run", "is missing state_rank1.safetensors"):
        proc = run_train(
            broken, *args, "--max-steps", "6", "--resume", "auto", zero="zero1_bf16_fp32_accum", check=False
        )
        assert proc.returncode == EXIT_USER_ERROR and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert refusal in proc.stderr and "state_rank1.safetensors" in proc.stderr.strip().splitlines()[-1]
        rank_file.unlink(missing_ok=True)
