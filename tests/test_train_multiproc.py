"""Two CPU processes (deepspeed launcher, gloo) under ZeRO-2 and ZeRO-3 against one process.

The run is built so that experts go unused on a rank: 2x2 images with patch 2 are ONE token per
sample and each rank's micro-batch is one sample, so top-2 of 4 experts leaves two experts
without a token on every rank, every step. A rank that skipped those experts' gradients would
hang or desynchronise the ZeRO reduce; losses and weights must instead match the single-process run.
The load-balancing loss is off here: it is computed over each rank's tokens, which by design
differs from the loss over the whole batch of a single process.
"""

import shutil

import pytest
import torch

from dit_moe.checkpoint import layout, load_model

from trainer_runs import losses, run_train

pytestmark = pytest.mark.multiproc
ONE_TOKEN = ["--image-size", "2", "--global-batch-size", "2", "--max-steps", "3", "--aux-loss-coef", "0"]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    run_train(out, *ONE_TOKEN)
    return out


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_two_ranks_match_single_process(single, tmp_path, zero):
    run_train(tmp_path, *ONE_TOKEN, zero=zero, launcher="deepspeed")
    expected, got = losses(single), losses(tmp_path)
    assert sorted(got) == [1, 2, 3]
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-5), step
    exported = load_model(tmp_path / "export.safetensors", prefer_ema=False)
    reference = load_model(single / "export.safetensors", prefer_ema=False)
    assert exported.config.input_size == 2 and exported.config.num_experts == 4
    for (name, a), b in zip(exported.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)


def test_resuming_on_another_number_of_processes_without_full_state_says_how_to_continue(single, tmp_path):
    shutil.copytree(single / "checkpoints", tmp_path / "checkpoints")
    for tag in (tmp_path / "checkpoints").glob("step*"):
        layout.state_index_file(tag).unlink()  # as --elastic-checkpoints false writes it
    proc = run_train(
        tmp_path,
        *ONE_TOKEN[:-4],
        "--max-steps",
        "4",
        "--aux-loss-coef",
        "0",
        "--resume",
        "auto",
        launcher="deepspeed",
        check=False,
    )
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "was written by 1 process(es) with --ep-size 1 under ZeRO-2 and this run is 2 process(es)" in out
    assert "--init-from" in out and "Traceback" not in out
