"""Faults and bad input end in one sentence with nothing lost (issue 20): YAML mistakes, a results
dir that holds another run, files safe loading refuses, and a kill during an export write."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from dit_moe.checkpoint import read_checkpoint_file, save_export
from dit_moe.models import DiT_models

from trainer_runs import REPO, env, run_train


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
    proc = subprocess.run(
        [sys.executable, "train_deepspeed.py", "--config", str(path), "--results-dir", str(tmp_path / "out")],
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
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
    proc = subprocess.run(
        [sys.executable, "sample.py", "--ckpt", str(path), "--device", "cpu", "--out", str(tmp_path / "grid.png")],
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
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
