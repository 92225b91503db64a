"""The DeepSpeed trainer on one CPU process: a short run, exact resume, crash safety, preemption, errors."""

import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from dit_moe.checkpoint import load_model, read_checkpoint_file
from dit_moe.checkpoint.layout import COMPLETE_MARKER, latest_complete_tag
from dit_moe.diffusion import ObjectiveConfig

from trainer_runs import REPO, env, losses, run_train, train_cmd


@pytest.fixture
def reference_run(trained_run):
    """4 uninterrupted steps, checkpoints every 2 (the suite's shared run)."""
    return trained_run


@pytest.mark.slow
def test_short_run_writes_metrics_curve_checkpoints_and_export(reference_run):
    out = reference_run
    records = losses(out)
    assert sorted(records) == [1, 2, 3, 4] and all(0 < v < 10 for v in records.values())
    assert (out / "loss_curve.png").stat().st_size > 1000
    assert (out / "config.yaml").is_file() and any((out / "tensorboard").iterdir())
    ckpts = out / "checkpoints"
    assert latest_complete_tag(ckpts) == "step0000004" and (ckpts / "step0000002" / COMPLETE_MARKER).is_file()
    assert read_checkpoint_file(ckpts).trained_as.recorded == ObjectiveConfig(
        timestep_sampler="uniform"
    )  # beside dit_config.json
    assert not list(out.rglob(".*.tmp*"))  # every write went through a temporary name and was renamed
    model = load_model(out / "export.safetensors")
    assert model.config.num_experts == 4 and model.config.input_size == 8 and model.config.num_classes == 10
    from_dir = load_model(ckpts)  # the checkpoint directory itself loads too (EMA weights)
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([1, 999]), torch.tensor([0, 9])
    torch.testing.assert_close(from_dir(x, t, y), model(x, t, y))
    raw = load_model(out / "export.safetensors", prefer_ema=False)
    assert not torch.equal(raw.final_layer.linear.weight, model.final_layer.linear.weight)  # EMA != weights
    raw_from_dir = load_model(ckpts, prefer_ema=False)  # the training weights of the last checkpoint
    for (name, a), b in zip(raw_from_dir.state_dict().items(), raw.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.slow
def test_resume_reproduces_the_uninterrupted_run(reference_run, tmp_path):
    run_train(tmp_path, "--global-batch-size", "8", "--max-steps", "2", "--ckpt-every", "2")
    run_train(tmp_path, "--global-batch-size", "8", "--max-steps", "4", "--ckpt-every", "2", "--resume", "auto")
    expected, got = losses(reference_run), losses(tmp_path)
    assert got[3] == expected[3] and got[4] == expected[4]  # bitwise equal in fp32 on the CPU
    resumed = load_model(tmp_path / "export.safetensors")
    reference = load_model(reference_run / "export.safetensors")
    for (name, a), b in zip(resumed.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.slow
def test_kill_during_checkpoint_write_keeps_previous_checkpoint(tmp_path):
    """kill -9 while checkpoints are being written every step, then resume."""
    proc = subprocess.Popen(
        train_cmd(tmp_path, "--global-batch-size", "8", "--max-steps", "200", "--ckpt-every", "1", "--keep-last", "2"),
        cwd=REPO,
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    ckpts = tmp_path / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and len(list(ckpts.glob(f"*/{COMPLETE_MARKER}"))) < 2:
        time.sleep(0.2)
    time.sleep(0.37)  # land somewhere inside the next save
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    tag = latest_complete_tag(ckpts)
    assert tag is not None
    load_model(ckpts / tag)
    step = int(tag.removeprefix("step"))
    run_train(tmp_path, "--global-batch-size", "8", "--max-steps", str(step + 1), "--resume", "auto")
    assert (ckpts / f"step{step + 1:07d}" / COMPLETE_MARKER).is_file()


@pytest.mark.slow
def test_incomplete_tag_is_skipped(reference_run, tmp_path):
    import shutil

    ckpts = tmp_path / "checkpoints"
    shutil.copytree(reference_run / "checkpoints", ckpts)
    (ckpts / "step0000004" / COMPLETE_MARKER).unlink()  # as if killed mid-write
    (ckpts / "step0000004" / "mp_rank_00_model_states.pt").write_bytes(b"trunc")
    assert latest_complete_tag(ckpts) == "step0000002"
    run_train(tmp_path, "--global-batch-size", "8", "--max-steps", "4", "--ckpt-every", "2", "--resume", "auto")
    assert losses(tmp_path)[4] == losses(reference_run)[4]


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly(tmp_path):
    proc = subprocess.Popen(
        train_cmd(tmp_path, "--global-batch-size", "8", "--max-steps", "500", "--ckpt-every", "1000"),
        cwd=REPO,
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    tag = latest_complete_tag(tmp_path / "checkpoints")
    assert tag is not None and int(tag.removeprefix("step")) < 500
    assert not (tmp_path / "export.safetensors").exists()  # an unfinished run is not exported


@pytest.mark.parametrize(
    "args,message",
    [
        (["--global-batch-size", "10", "--train_batch_size", "3"], "Global batch 10 is not divisible by micro batch 3"),
        (["--dataset", "folder", "--data-path", "/nonexistent/images", "--vae-path", "none"], "/nonexistent/images"),
        (["--dataset", "folder", "--data-path", "{tmp}", "--vae-path", "/nonexistent/vae"], "/nonexistent/vae"),
        (["--deepspeed_config", "config/zero9.json"], "config/zero9.json does not exist"),
    ],
)
def test_bad_input_gives_one_line_error(tmp_path, args, message):
    (tmp_path / "cls0").mkdir()
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "cls0" / "a.png")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    proc = run_train(tmp_path / "out", "--max-steps", "1", "--global-batch-size", "8", *args, check=False)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.strip().splitlines() if line.startswith("train_deepspeed.py: error:")]
    assert len(lines) == 1 and message in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_masked_training_logs_the_mae_term_and_exports_a_model_that_runs_unmasked(tmp_path):
    run_train(
        tmp_path,
        "--global-batch-size",
        "8",
        "--max-steps",
        "2",
        "--mask-ratio",
        "0.5",
        "--decoder-depth",
        "1",
        "--decoder-hidden-size",
        "64",
        "--decoder-num-heads",
        "4",
    )
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(rec["mae"] > 0 and rec["loss"] > 0 for rec in records)
    model = load_model(tmp_path / "export.safetensors")
    assert model.config.decoder_depth == 1 and model.config.decoder_hidden_size == 64
    out = model(torch.randn(2, 3, 8, 8), torch.tensor([1, 999]), torch.tensor([0, 9]))  # mask ratio 0: all tokens
    assert out.shape == (2, 6, 8, 8) and torch.isfinite(out).all()


@pytest.mark.slow
def test_init_from_an_upcycled_dense_run_starts_where_the_dense_model_was(tmp_path):
    dense = tmp_path / "dense"
    run_train(dense, "--global-batch-size", "8", "--max-steps", "2", "--num_experts", "0")
    moe_file = tmp_path / "moe.safetensors"
    subprocess.run(
        [
            sys.executable,
            "upcycle.py",
            "--ckpt",
            str(dense / "export.safetensors"),
            "--num_experts",
            "4",
            "--num_experts_per_tok",
            "2",
            "--out",
            str(moe_file),
        ],
        cwd=REPO,
        env=env(),
        check=True,
        capture_output=True,
    )
    continued, upcycled = tmp_path / "continued", tmp_path / "upcycled"
    common = ("--global-batch-size", "8", "--max-steps", "1", "--seed", "5")
    run_train(continued, *common, "--init-from", str(dense / "export.safetensors"), "--num_experts", "0")
    run_train(upcycled, *common, "--init-from", str(moe_file))
    # same data, noise and timesteps; the upcycled model computes the dense function at step 0
    assert losses(upcycled)[1] == pytest.approx(losses(continued)[1], rel=1e-5)
    model = load_model(upcycled / "export.safetensors")
    assert model.config.num_experts == 4 and model.config.input_size == 8  # shape from the file, not the flags
    assert load_model(continued / "export.safetensors").config.num_experts == 0
