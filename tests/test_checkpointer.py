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
