"""Faults and bad input end in one sentence with nothing lost (issue 20): YAML mistakes, a results
dir that holds another run, files safe loading refuses, a kill during an export write, a full disk
before or during a checkpoint, and SIGTERM to the `deepspeed` launcher (preemption)."""

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

from dit_moe.checkpoint import read_checkpoint_file, save_export
from dit_moe.models import DiT_models

from trainer_runs import REPO, env, losses, run_in_repo, run_train, train_cmd


def _one_error_line(proc, prog: str) -> str:
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.strip().splitlines() if line.startswith(f"{prog}: error:")]
    assert len(lines) == 1, proc.stderr[-2000:]
    return lines[0]


@pytest.mark.parametrize(
    "text,expected",
    [
        ("model:\n  num_experts: four\n", "[model] num_experts: expected an integer, got 'four'"),
        ("run:\n  max_steps: ten\n", "[run] max_steps: expected an integer, got 'ten'"),
        ("run:\n  lr: fast\n", "[run] lr: expected a number, got 'fast'"),
        ("model:\n  moe_layers: 1\n", "[model] moe_layers: expected a list of integers"),
        ("objective:\n  objective: flow\n  noise_schedule: [1]\n", "[objective] noise_schedule: expected a string"),
        ("model:\n  num_experts: 4\n   bad: indent\n", "YAML syntax error at line 3"),
        ("model: [1, 2\n", "YAML syntax error"),
    ],
)
def test_yaml_mistakes_name_file_section_and_key(tmp_path, text, expected):
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    proc = run_in_repo(
        [sys.executable, "train_deepspeed.py", "--config", str(path), "--results-dir", str(tmp_path / "out")],
        timeout=120,
    )
    line = _one_error_line(proc, "train_deepspeed.py")
    assert str(path) in line and expected in line, line
    assert not (tmp_path / "out").exists()


def test_yaml_numbers_in_exponent_form_are_numbers(tmp_path):
    from dit_moe.train.config import load_config

    path = tmp_path / "exp.yaml"
    path.write_text("run:\n  lr: 1e-3\n  ema_decay: 1\n")  # YAML 1.1 reads 1e-3 as a string
    cfg = load_config(["--config", str(path), "--dataset", "digits"])
    assert cfg.run.lr == 1e-3 and cfg.run.ema_decay == 1.0 and isinstance(cfg.run.ema_decay, float)


def test_fresh_run_into_a_results_dir_holding_a_run_is_refused(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n')
    (out / "export.safetensors").write_bytes(b"earlier run")
    proc = run_train(out, "--max-steps", "1", "--global-batch-size", "8", check=False, timeout=120)
    line = _one_error_line(proc, "train_deepspeed.py")
    assert "already holds a run" in line and "--resume auto" in line and "--overwrite True" in line
    assert (out / "export.safetensors").read_bytes() == b"earlier run"
    assert (out / "metrics.jsonl").read_text() == '{"step": 1, "loss": 0.5}\n'


@pytest.mark.slow
def test_overwrite_replaces_the_earlier_run(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoints" / "step0000100").mkdir(parents=True)
    (out / "metrics.jsonl").write_text('{"step": 100, "loss": 9.0}\n')
    run_train(out, "--max-steps", "2", "--global-batch-size", "8", "--ckpt-every", "2", "--overwrite", "True")
    steps = [line for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == 2 and '"step": 100' not in steps[0]
    assert not (out / "checkpoints" / "step0000100").exists() and (out / "export.safetensors").is_file()


class _Evil:
    """Unpicklable by weights_only loading: a class that is not an allowed global."""


def test_pt_refused_by_safe_loading_is_one_sentence(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": _Evil()}, path)
    proc = run_in_repo(
        [sys.executable, "sample.py", "--ckpt", str(path), "--device", "cpu", "--out", str(tmp_path / "grid.png")],
        timeout=120,
    )
    line = _one_error_line(proc, "sample.py")
    assert "safe loading" in line and "_Evil" in line and str(path) in line, line
    assert "Please file an issue" not in proc.stderr and not (tmp_path / "grid.png").exists()


_WRITER = """
import sys, torch
from dit_moe.checkpoint import save_export
from dit_moe.models import DiT_models
torch.manual_seed(0)
model = DiT_models["DiT-T/2"](input_size=8, in_channels=1, num_classes=10, num_experts=4)
big = {k: v + 1.0 for k, v in model.state_dict().items()}
big["pad"] = torch.ones(16_000_000)  # 64 MB: the write takes long enough to be killed inside it
print("ready", flush=True)
while True:
    save_export(sys.argv[1], model.config, big, {k: v.clone() for k, v in big.items()})
"""


def test_kill_during_export_write_leaves_the_earlier_export_whole(tmp_path):
    torch.manual_seed(0)  # the writer's model, before its + 1.0
    model = DiT_models["DiT-T/2"](input_size=8, in_channels=1, num_classes=10, num_experts=4)
    ema = {k: v.clone() for k, v in model.state_dict().items()}
    path = save_export(tmp_path / "export.safetensors", model.config, model.state_dict(), ema)
    before = read_checkpoint_file(path).state_dict
    for delay in (0.05, 0.3, 0.8):
        proc = subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(path)], cwd=REPO, env=env(), stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        after = read_checkpoint_file(path).state_dict  # whole: it parses
        if "pad" in after:  # the new export landed in full
            assert torch.equal(after["x_embedder.proj.weight"], before["x_embedder.proj.weight"] + 1.0)
        else:
            assert all(torch.equal(after[k], v) for k, v in before.items())
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "export.safetensors"]
    assert all(name.startswith(".") for name in leftovers), leftovers  # only killed writers' hidden temp files


def test_out_of_space_errors_are_recognised(tmp_path, monkeypatch):
    from dit_moe.train import disk

    assert disk.is_out_of_space(OSError(errno.ENOSPC, "No space left on device"))
    assert disk.is_out_of_space(
        RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
    )
    assert not disk.is_out_of_space(OSError(errno.EACCES, "Permission denied"))
    space = disk.CheckpointSpace(tmp_path, needed=10_000, keep_last=3, device=torch.device("cpu"))
    monkeypatch.setattr(disk, "free_bytes", lambda path: 10**12)
    with pytest.raises(RuntimeError, match="unexpected pos"), space.guard(tmp_path / "a.pt"):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    monkeypatch.setattr(disk, "free_bytes", lambda path: 100)  # torch's zip writer on a full disk says only this
    with space.guard(tmp_path / "a.pt"):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    assert space.failure.startswith(f"{tmp_path / 'a.pt'}: ")
    monkeypatch.setattr(disk, "free_bytes", lambda path: 10**12)
    with space.guard(tmp_path / "ema.safetensors"):  # what save_file raises on a full tmpfs
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


def test_expected_checkpoint_size_is_the_previous_tag_or_the_parameter_estimate(tmp_path):
    from dit_moe.checkpoint import layout
    from dit_moe.train import disk

    assert disk.expected_bytes(tmp_path, 1000) == 1000  # no tag yet: the estimate
    tag = tmp_path / layout.tag_for_step(2)
    tag.mkdir()
    (tag / "model.pt").write_bytes(b"x" * 100_000)
    layout.mark_complete(tmp_path, tag.name, 2)
    assert 100_000 <= disk.expected_bytes(tmp_path, 1000) == disk.size_on_disk(tag) < 120_000


def _full_disk_cmd(mode: str, results_dir, *args) -> list[str]:
    return [sys.executable, "tests/full_disk.py", mode, *train_cmd(results_dir, *args)[1:]]


_DISK_ARGS = ("--global-batch-size", "8", "--ckpt-every", "2")


@pytest.mark.slow
def test_too_little_free_space_stops_before_writing_a_checkpoint(tmp_path):
    out = tmp_path / "run"
    cmd = _full_disk_cmd("free=1000", out, "--max-steps", "2", *_DISK_ARGS)
    proc = run_in_repo(cmd, timeout=300)
    line = _one_error_line(proc, "train_deepspeed.py")
    assert f"{out / 'checkpoints'}: 1,000 bytes free, about " in line and "--keep-last (now 3)" in line, line
    assert "--results-dir" in line and not list((out / "checkpoints").glob("step*"))


@pytest.mark.slow
def test_disk_full_during_a_checkpoint_removes_it_and_resume_continues_exactly(tmp_path):
    from dit_moe.checkpoint import load_model
    from dit_moe.train import disk

    reference, out = tmp_path / "reference", tmp_path / "run"
    run_train(reference, "--max-steps", "4", *_DISK_ARGS)
    cmd = _full_disk_cmd("enospc=step0000004", out, "--max-steps", "4", *_DISK_ARGS)
    proc = run_in_repo(cmd, timeout=300)
    line = _one_error_line(proc, "train_deepspeed.py")
    checkpoints = out / "checkpoints"
    assert f"writing checkpoint {checkpoints / 'step0000004'} (removed; the previous checkpoint" in line, line
    assert not (checkpoints / "step0000004").exists() and (checkpoints / "latest").read_text() == "step0000002"
    load_model(checkpoints)
    low = 3 * disk.size_on_disk(checkpoints / "step0000002") // 2  # room for one more checkpoint, not two
    cmd = _full_disk_cmd(f"free={low}", out, "--max-steps", "4", *_DISK_ARGS, "--resume", "auto")
    proc = run_in_repo(cmd, timeout=300)
    assert proc.returncode == 0 and f"Disk space is low for checkpoints in {checkpoints}" in proc.stderr, proc.stderr
    assert losses(out) == losses(reference)


@pytest.mark.slow
@pytest.mark.multiproc
def test_disk_full_on_one_rank_stops_every_rank_and_removes_the_partial_checkpoint(tmp_path):
    out = tmp_path / "run"
    cmd = train_cmd(out, "--max-steps", "4", *_DISK_ARGS, launcher="deepspeed")
    script = cmd.index("train_deepspeed.py")
    cmd[script:script] = ["tests/full_disk.py", "enospc=step0000004/.state_rank1"]  # rank 1's file only
    proc = run_in_repo(cmd, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
    errors = {
        line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("train_deepspeed.py: error:")
    }
    checkpoints = out / "checkpoints"
    assert len(errors) == 1 and f"writing checkpoint {checkpoints / 'step0000004'} (removed;" in errors.pop()
    assert not (checkpoints / "step0000004").exists() and (checkpoints / "latest").read_text() == "step0000002"


PREEMPTION_BOUND_S = 90  # one step plus one checkpoint of the tiny model, with room for a busy shared CPU


def _wait_for_first_step(results_dir, proc, timeout: float = 300) -> None:
    metrics = results_dir / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while not (metrics.is_file() and metrics.read_text().strip()):
        assert proc.poll() is None and time.monotonic() < deadline, "the trainer never logged a step"
        time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.multiproc
def test_sigterm_to_the_deepspeed_launcher_checkpoints_every_rank_and_resumes_exactly(tmp_path):
    import psutil

    from dit_moe.checkpoint import layout

    out, reference = tmp_path / "run", tmp_path / "reference"
    args = ("--global-batch-size", "8", "--ckpt-every", "1000")
    with open(tmp_path / "launcher.log", "w") as log_file:
        launcher = subprocess.Popen(
            train_cmd(out, "--max-steps", "500", *args, launcher="deepspeed"),
            cwd=REPO,
            env=env(),
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        _wait_for_first_step(out, launcher)
        ranks = psutil.Process(launcher.pid).children(recursive=True)
        launcher.send_signal(signal.SIGTERM)
        start = time.monotonic()
        launcher.wait(timeout=PREEMPTION_BOUND_S)
        _, alive = psutil.wait_procs(ranks, timeout=PREEMPTION_BOUND_S)
    assert not alive and time.monotonic() - start < PREEMPTION_BOUND_S, (tmp_path / "launcher.log").read_text()[-3000:]
    stopped = max(losses(out))
    assert 0 < stopped < 500 and layout.latest_complete_tag(out / "checkpoints") == layout.tag_for_step(stopped)
    assert layout.rng_file_count(out / "checkpoints" / layout.tag_for_step(stopped)) == 2
    run_train(out, "--max-steps", str(stopped + 2), *args, "--resume", "auto", launcher="deepspeed")
    run_train(reference, "--max-steps", str(stopped + 2), *args, launcher="deepspeed")
    assert losses(out) == losses(reference)


@pytest.mark.slow
@pytest.mark.multiproc
def test_sigterm_to_launch_sh_waits_until_every_rank_has_checkpointed(tmp_path):
    import psutil

    from dit_moe.checkpoint import layout
    from dit_moe.utils.launch import free_port

    out = tmp_path / "run"
    flags = train_cmd(out, "--max-steps", "500", "--global-batch-size", "8", "--ckpt-every", "1000")[2:]
    script_env = dict(
        env(), DEEPSPEED=str(Path(sys.executable).parent / "deepspeed"), NUM_GPUS="2", MASTER_PORT=str(free_port())
    )
    with open(tmp_path / "launch.log", "w") as log_file:
        script = subprocess.Popen(
            ["bash", "scripts/launch.sh", *flags], cwd=REPO, env=script_env, stdout=log_file, stderr=subprocess.STDOUT
        )
        _wait_for_first_step(out, script)
        launched = psutil.Process(script.pid).children(recursive=True)
        script.send_signal(signal.SIGTERM)
        script.wait(timeout=PREEMPTION_BOUND_S)
    _, alive = psutil.wait_procs(launched, timeout=0)
    assert script.returncode == 128 + signal.SIGTERM and not alive, (tmp_path / "launch.log").read_text()[-3000:]
    stopped = max(losses(out))
    assert layout.latest_complete_tag(out / "checkpoints") == layout.tag_for_step(stopped)


@pytest.mark.slow
@pytest.mark.multiproc
def test_a_cpu_run_leaves_no_shared_memory_behind(tmp_path):
    """DeepSpeed's CPU all-reduce op never unlinks its ~69 MB /dev/shm buffer per rank; the trainer does."""
    cmd = train_cmd(tmp_path / "run", "--max-steps", "1", "--global-batch-size", "8", launcher="deepspeed")
    port = cmd[cmd.index("--master_port") + 1]
    buffers = [
        Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{port}_{rank}" for rank in (0, 1)
    ]
    proc = run_in_repo(cmd, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not any(buffer.exists() for buffer in buffers)
