"""Faults and bad input end in one sentence with nothing lost (issue 20): YAML mistakes, a results
dir that holds another run, files safe loading refuses, a kill during an export write, a full disk
before or during a checkpoint, and SIGTERM to the `deepspeed` launcher (preemption)."""

import errno
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
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


@pytest.mark.parametrize(
    "args,expected",
    [
        (("--global-batch-size", "7", "--micro-batch-size", "2"), "Global batch 7 is not divisible by micro batch 2"),
        (("--global-batch-size", "8", "--dataset", "folder"), "--data-path"),
        (("--global-batch-size", "8", "--deepspeed_config", "BAD_JSON"), "is not valid JSON"),
        (("--global-batch-size", "8", "--ep-size", "3"), "--ep-size 3 must divide the number of processes (1)"),
    ],
)
def test_a_bad_input_in_an_earlier_runs_folder_is_named_before_the_folder_is_claimed(tmp_path, args, expected):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n')
    bad_json = tmp_path / "zero2.json"
    bad_json.write_text(
        '{"zero_optimization": {"stage": 2}'
    )  # unclosed: DeepSpeed refuses it too (a trailing comma it accepts)
    args = [str(bad_json) if arg == "BAD_JSON" else arg for arg in args]
    proc = run_train(out, "--max-steps", "1", *args, check=False, timeout=180)
    line = _one_error_line(proc, "train_deepspeed.py")
    assert expected in line and "already holds a run" not in line, line
    assert sorted(p.name for p in out.iterdir()) == ["metrics.jsonl"]


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


class _Planted:
    """A pickle that creates `path` when unpickled by a loader that runs what a file names."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


def _stranger_tag(root: Path, payload) -> Path:
    """A complete DeepSpeed tag without an EMA file whose model-states file holds `payload`."""
    from dit_moe.checkpoint import layout

    checkpoints = root / layout.CHECKPOINTS_DIR
    tag = checkpoints / layout.tag_for_step(1)
    tag.mkdir(parents=True)
    torch.save(payload, tag / "mp_rank_00_model_states.pt")
    layout.mark_complete(checkpoints, tag.name, 1)
    return tag


def test_a_strangers_deepspeed_tag_runs_no_code_when_loaded(tmp_path):
    planted = tmp_path / "planted"
    model = DiT_models["DiT-T/2"](input_size=8, in_channels=1, num_classes=10, num_experts=4)
    _stranger_tag(tmp_path / "run", {"module": model.state_dict(), "client": _Planted(planted)})
    for ckpt in (tmp_path / "run", tmp_path / "run" / "checkpoints"):
        proc = run_in_repo(
            [sys.executable, "sample.py", "--ckpt", str(ckpt), "--device", "cpu", "--out", str(tmp_path / "grid.png")],
            timeout=120,
        )
        line = _one_error_line(proc, "sample.py")
        assert "safe loading" in line and "mp_rank_00_model_states.pt" in line, line
        assert not planted.exists() and not (tmp_path / "grid.png").exists()


@pytest.mark.slow
def test_resume_through_deepspeeds_own_files_runs_no_code_a_tag_names(tmp_path):
    """Without the sharded state (--elastic-checkpoints false) a resume reads DeepSpeed's pickled model and
    optimizer files through DeepSpeed's loader, which unpickles freely; ours allows their few classes only."""
    args = ("--global-batch-size", "4", "--ckpt-every", "2", "--elastic-checkpoints", "false")
    resume = ("--max-steps", "4", "--resume", "auto")
    clean, stranger = tmp_path / "clean", tmp_path / "stranger"
    run_train(clean, *args, "--max-steps", "2")
    shutil.copytree(clean, stranger)
    run_train(clean, *args, *resume)  # DeepSpeed's real model and optimizer files pass
    assert sorted(losses(clean)) == [1, 2, 3, 4]

    model_states = stranger / "checkpoints" / "step0000002" / "mp_rank_00_model_states.pt"
    planted = tmp_path / "planted"
    state = torch.load(model_states, weights_only=False)
    torch.save({**state, "planted": _Planted(planted)}, model_states)
    with open(model_states, "rb") as probe:  # the payload works on a loader that runs what a file names
        torch.load(probe, weights_only=False)
    assert planted.exists()
    planted.unlink()
    proc = run_train(stranger, *args, *resume, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "safe loading" in last and "mp_rank_00_model_states.pt" in last and "io.open" in last, last
    assert not planted.exists()


def test_deepspeed_objects_beside_the_weights_load_as_inert_stand_ins(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    model = DiT_models["DiT-T/2"](input_size=8, in_channels=1, num_classes=10, num_experts=4)
    extras = {
        "scaler": DynamicLossScaler(2.0**16, 1000, 1.0, 2, False),
        "stage": ZeroStageEnum(2),
        "frozen": {"w": fragment_address(4, 0)},
    }
    _stranger_tag(tmp_path / "run", {"module": model.state_dict(), **extras})
    loaded = read_checkpoint_file(tmp_path / "run", prefer_ema=False).state_dict
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())


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
    inside_a_write = 0
    for delay in (0.05, 0.3, 0.8, "at the write"):
        proc = subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(path)], cwd=REPO, env=env(), stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout.readline().strip() == "ready"
        if delay == "at the write":  # as soon as its temporary file appears: the kill lands inside a write
            deadline = time.monotonic() + 60
            while not path.with_name(f".export.{proc.pid}.tmp.safetensors").exists():
                assert time.monotonic() < deadline, "the writer never started a write"
        else:
            time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        temp_files = {p.name for p in tmp_path.iterdir() if p.name.startswith(".")}
        inside_a_write += any(f".{proc.pid}." in name for name in temp_files)  # this writer's temporary file is left
        after = read_checkpoint_file(path).state_dict  # whole: it parses
        if "pad" in after:  # the new export landed in full
            assert torch.equal(after["x_embedder.proj.weight"], before["x_embedder.proj.weight"] + 1.0)
        else:
            assert all(torch.equal(after[k], v) for k, v in before.items())
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "export.safetensors"]
    assert all(name.startswith(".") for name in leftovers), leftovers  # only killed writers' hidden temp files
    assert inside_a_write >= 1  # positive control: at least one kill landed inside a write


def _on_a_small_disk(disk: Path, size: int, cmd: list[str], timeout: int = 180) -> subprocess.CompletedProcess:
    """Run `cmd` with a real `size`-byte file system (tmpfs) mounted at `disk`, in a private user and mount
    namespace: nothing outside the command sees the mount, and it goes away with the command."""
    if shutil.which("unshare") is None:
        pytest.skip("needs util-linux's unshare for a private small file system")
    disk.mkdir(exist_ok=True)
    script = 'mount -t tmpfs -o size="$1" tmpfs "$2" || exit 99; shift 2; exec "$@"'
    proc = run_in_repo(["unshare", "-rm", "sh", "-c", script, "sh", str(size), str(disk), *cmd], timeout)
    if proc.returncode == 99 or "unshare failed" in proc.stderr:
        pytest.skip(f"this machine does not allow a private tmpfs mount: {proc.stderr.strip()[-200:]}")
    return proc


# Each writer the package uses, on a disk too small for its 8 MB of data, over an earlier file of that name.
_FULL_DISK_WRITES = """
import json, sys
from pathlib import Path
import numpy as np, torch
from PIL import Image
from safetensors.torch import save_file
from dit_moe.checkpoint import save_export
from dit_moe.models import DiT_models
from dit_moe.utils.atomic import atomic_path

disk, big = Path(sys.argv[1]), torch.randn(2_000_000)
model = DiT_models["DiT-T/2"](input_size=8, in_channels=1, num_classes=10, num_experts=4)
writes = {
    "weights.safetensors": lambda tmp: save_file({"w": big}, str(tmp)),
    "state.pt": lambda tmp: torch.save({"w": big}, tmp),
    "samples.npz": lambda tmp: np.savez(open(tmp, "wb"), arr_0=big.numpy()),
    "grid.png": lambda tmp: Image.fromarray(np.random.randint(0, 255, (2000, 2000, 3), np.uint8)).save(tmp),
}
report = {}
for name, write in [*writes.items(), ("export.safetensors", None)]:
    path = disk / name
    path.write_bytes(b"previous")
    try:
        if write is None:
            save_export(path, model.config, {"pad": big, **model.state_dict()})
        else:
            with atomic_path(path) as tmp:
                write(tmp)
        error = None
    except Exception as err:
        error = [type(err).__name__, str(err)]
    report[name] = [error, path.read_bytes() == b"previous", sorted(p.name for p in disk.iterdir())]
    path.unlink()
print(json.dumps(report))
"""


def test_a_full_disk_during_any_write_is_one_sentence_and_the_previous_file_is_intact(tmp_path):
    disk = tmp_path / "disk"
    proc = _on_a_small_disk(disk, 4 * 2**20, [sys.executable, "-c", _FULL_DISK_WRITES, str(disk)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, (error, previous_intact, files) in report.items():
        assert error is not None and error[0] == "DiskFull", (name, error)
        message = error[1]
        assert str(disk / name) in message and "\n" not in message, message
        assert f"the previous {name} there is unchanged" in message, message
        assert previous_intact and files == [name], (name, files)  # no temporary file left behind
    assert "Not enough disk space to write" in report["export.safetensors"][0][1]  # checked before writing
    assert "disk is full" in report["state.pt"][0][1]  # torch's "unexpected pos" recognised


def test_sample_py_on_a_full_disk_says_so_in_one_line(tmp_path, tiny_export):
    disk = tmp_path / "disk"
    fill = f'cat /dev/zero > {disk}/filler 2>/dev/null; printf previous > {disk}/grid.png; exec "$@"'
    cmd = ["sh", "-c", fill, "sh", sys.executable, "sample.py", "--ckpt", str(tiny_export), "--device", "cpu"]
    proc = _on_a_small_disk(disk, 2**20, [*cmd, "--num-sampling-steps", "2", "--out", str(disk / "grid.png")])
    line = _one_error_line(proc, "sample.py")
    assert f"Writing {disk / 'grid.png'} failed because the disk is full" in line, line


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
    space.failure = None
    with space.guard(tmp_path / "ema.safetensors"):  # what save_file raises on a full tmpfs
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert space.failure.startswith(f"{tmp_path / 'ema.safetensors'}: ") and "os error 28" in space.failure


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
@pytest.mark.parametrize("part", ["step0000004/.ema", "step0000004/.rng_rank0", "step0000004/.state_rank0"])
def test_disk_full_at_any_checkpoint_file_removes_the_tag_and_keeps_the_previous(tmp_path, part):
    out = tmp_path / "run"
    proc = run_in_repo(_full_disk_cmd(f"enospc={part}", out, "--max-steps", "4", *_DISK_ARGS), timeout=300)
    line = _one_error_line(proc, "train_deepspeed.py")
    checkpoints = out / "checkpoints"
    assert f"writing checkpoint {checkpoints / 'step0000004'} (removed; the previous checkpoint" in line, line
    assert not (checkpoints / "step0000004").exists() and (checkpoints / "latest").read_text() == "step0000002"
    assert read_checkpoint_file(checkpoints).state_dict


@pytest.mark.slow
def test_export_on_a_full_disk_is_one_sentence_after_the_last_checkpoint(tmp_path):
    out = tmp_path / "run"
    proc = run_in_repo(_full_disk_cmd("enospc=.export.", out, "--max-steps", "2", *_DISK_ARGS), timeout=300)
    line = _one_error_line(proc, "train_deepspeed.py")
    assert f"Writing {out / 'export.safetensors'} failed because the disk is full" in line, line
    assert (out / "checkpoints" / "latest").read_text() == "step0000002" and not (out / "export.safetensors").exists()


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
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if "train_deepspeed.py: error:" in line]
    checkpoints = out / "checkpoints"
    assert len(errors) == 1 and f"writing checkpoint {checkpoints / 'step0000004'} (removed;" in errors[0], errors
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


def _shm_buffers(cmd) -> list[Path]:
    """The /dev/shm buffers DeepSpeed's CPU all-reduce op creates for the two ranks `cmd` launches."""
    port = cmd[cmd.index("--master_port") + 1]
    return [Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{port}_{rank}" for rank in (0, 1)]


@pytest.mark.slow
@pytest.mark.multiproc
def test_a_cpu_run_leaves_no_shared_memory_behind(tmp_path):
    """DeepSpeed's CPU all-reduce op never unlinks its ~69 MB /dev/shm buffer per rank; the trainer does."""
    cmd = train_cmd(tmp_path / "run", "--max-steps", "1", "--global-batch-size", "8", launcher="deepspeed")
    buffers, seen = _shm_buffers(cmd), set()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while proc.poll() is None:  # positive control: the names are right, and the run did create them
        seen.update(buffer for buffer in buffers if buffer.exists())
        time.sleep(0.05)
    assert proc.returncode == 0, proc.stderr.read()[-2000:]
    assert seen == set(buffers) and not any(buffer.exists() for buffer in buffers)


def _hold_mapped(path: Path) -> subprocess.Popen:
    """A process that maps `path` (as a live rank maps its buffer) until killed."""
    code = "import mmap, sys, time; f = open(sys.argv[1], 'r+b'); m = mmap.mmap(f.fileno(), 0); f.close(); "
    code += "print('mapped', flush=True); time.sleep(300)"
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "mapped"
    return proc


def test_stale_shm_buffers_are_removed_only_when_no_process_maps_them_and_they_are_old(tmp_path):
    from dit_moe.train.distributed import ERROR_MARK_PREFIX, SHM_BUFFER_PREFIX, STALE_AFTER_S, remove_stale_run_files

    names = ("dead", "live", "starting", "other")
    paths = {name: tmp_path / f"{SHM_BUFFER_PREFIX}{os.getuid()}_127.0.0.1_{name}_0" for name in names}
    paths["other"] = tmp_path / f"{SHM_BUFFER_PREFIX}{os.getuid() + 1}_127.0.0.1_1_0"  # another user's
    for path in paths.values():
        path.write_bytes(b"\0" * 4096)
    old = time.time() - 2 * STALE_AFTER_S
    for name in ("dead", "live", "other"):
        os.utime(paths[name], (old, old))
    holder = _hold_mapped(paths["live"])
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    marks = [
        Path(tempfile.gettempdir(), f"{ERROR_MARK_PREFIX}{os.getuid()}_{pid}_29500") for pid in (gone.pid, os.getpid())
    ]
    for mark in marks:
        mark.touch()
    try:
        assert remove_stale_run_files(tmp_path) == [paths["dead"]]
    finally:
        holder.kill()
        holder.wait()
    assert [name for name in names if paths[name].exists()] == ["live", "starting", "other"]
    assert [mark.exists() for mark in marks] == [False, True]  # the mark of a launcher that is gone is removed
    marks[1].unlink()


@pytest.mark.slow
@pytest.mark.multiproc
def test_a_killed_runs_shm_is_removed_at_the_next_start_which_names_its_mistake_once(tmp_path):
    import psutil

    from dit_moe.train.distributed import STALE_AFTER_S

    out = tmp_path / "run"
    cmd = train_cmd(out, "--max-steps", "500", "--global-batch-size", "8", launcher="deepspeed")
    buffers = _shm_buffers(cmd)
    killed = subprocess.Popen(cmd, cwd=REPO, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for_first_step(out, killed)
    for proc in [*psutil.Process(killed.pid).children(recursive=True), psutil.Process(killed.pid)]:
        proc.kill()  # kill -9 of every process: no exit handler runs
    killed.wait()
    time.sleep(1)
    assert all(buffer.exists() for buffer in buffers)  # positive control: SIGKILL leaks them
    old = time.time() - 2 * STALE_AFTER_S
    for buffer in buffers:
        os.utime(buffer, (old, old))
    proc = run_in_repo(train_cmd(out, "--max-steps", "1", "--global-batch-size", "7", launcher="deepspeed"), 300)
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if "train_deepspeed.py: error:" in line]
    assert proc.returncode == 2 and len(errors) == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Global batch 7 is not divisible" in errors[0] and "Traceback" not in proc.stderr
    assert not any(buffer.exists() for buffer in buffers)


def test_only_the_first_failing_rank_of_a_launch_reports(monkeypatch):
    from dit_moe.train.distributed import ERROR_MARK_PREFIX, first_to_report
    from dit_moe.utils.launch import free_port

    port = str(free_port())
    monkeypatch.setenv("MASTER_PORT", port)
    monkeypatch.setenv("WORLD_SIZE", "2")
    mark = Path(tempfile.gettempdir(), f"{ERROR_MARK_PREFIX}{os.getuid()}_{os.getppid()}_{port}")
    try:
        assert [first_to_report(), first_to_report()] == [True, False]  # two ranks of one launch: one speaks
    finally:
        mark.unlink(missing_ok=True)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert first_to_report() and first_to_report() and not mark.exists()  # a single process always speaks


def test_warnings_before_the_log_exists_are_written_once_by_rank_0():
    """Start-up notices (a stale buffer removed, a VAE at another path) are held, then written into the
    run's log by rank 0 only (the trainer's stderr side is test_data_integrity's one-line test)."""
    from dit_moe.train.startup_notices import hold_startup_notices, take_startup_notices, write_startup_notices

    log, seen = logging.getLogger("dit_moe.train.notices_test"), []
    collect = logging.Handler()
    collect.emit = lambda record: seen.append(record.getMessage())
    hold_startup_notices()
    hold_startup_notices()  # idempotent: one copy held
    log.warning("held notice")
    held = take_startup_notices()
    assert [record.getMessage() for record in held] == ["held notice"]
    log.addHandler(collect)  # the run's logging, configured after the notices were taken
    try:
        write_startup_notices(held, rank=1)
        assert seen == []  # another rank: one copy per run
        write_startup_notices(held, rank=0)
        assert seen == ["held notice"]
    finally:
        log.removeHandler(collect)
    assert take_startup_notices() == []  # released: nothing holds any more
