"""The shell launchers: the presets build the documented deepspeed command, and missing settings stop early."""

import os
import stat
import subprocess
from pathlib import Path

import pytest

from dit_moe.train.config import load_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def fake_deepspeed(tmp_path):
    """A `deepspeed` on PATH that records its arguments instead of launching."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "argv.txt"
    script = bin_dir / "deepspeed"
    script.write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$@" > {record}\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return bin_dir, record


def run_script(name, env_extra, bin_dir, *args):
    env = {k: v for k, v in os.environ.items() if k not in ("HOSTFILE", "FEATURES_PATH", "DATA_PATH", "VAE_PATH")}
    env.update(env_extra, DEEPSPEED=str(bin_dir / "deepspeed"))
    return subprocess.run(["bash", f"scripts/{name}", *args], cwd=REPO, env=env, capture_output=True, text=True)


def test_train_xl_rf_launches_xl_8e2a_flow_on_the_hostfile(fake_deepspeed, tmp_path):
    bin_dir, record = fake_deepspeed
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-0 slots=8\nnode-1 slots=8\n")
    proc = run_script(
        "train_xl_rf.sh",
        dict(HOSTFILE=str(hostfile), FEATURES_PATH="/data/latents", VAE_PATH="/models/vae"),
        bin_dir,
        "--max-steps",
        "5",
    )
    assert proc.returncode == 0, proc.stderr
    argv = record.read_text().split("\n")[:-1]
    assert argv[argv.index("--hostfile") + 1] == str(hostfile)
    script_at = argv.index("train_deepspeed.py")
    cfg = load_config(argv[script_at + 1 :])  # what the trainer would parse on every rank
    assert (cfg.model.model, cfg.model.num_experts, cfg.model.num_experts_per_tok) == ("DiT-XL/2", 8, 2)
    assert cfg.objective.objective == "flow" and cfg.run.deepspeed_config == "config/zero2.json"
    assert (cfg.data.dataset, cfg.data.features_path, cfg.data.vae_path) == ("latents", "/data/latents", "/models/vae")
    assert cfg.run.max_steps == 5 and cfg.run.resume == "auto"


@pytest.mark.parametrize(
    "script,model,experts",
    [("train_s.sh", "DiT-S/2", 8), ("train_b.sh", "DiT-B/2", 8), ("train_g_rf.sh", "DiT-G/2", 16)],
)
def test_presets_on_one_node_use_an_image_folder(fake_deepspeed, script, model, experts):
    bin_dir, record = fake_deepspeed
    proc = run_script(script, dict(DATA_PATH="/data/train", VAE_PATH="/models/vae"), bin_dir)
    assert proc.returncode == 0, proc.stderr
    argv = record.read_text().split("\n")[:-1]
    assert "--hostfile" not in argv
    cfg = load_config(argv[argv.index("train_deepspeed.py") + 1 :])
    assert (cfg.model.model, cfg.model.num_experts, cfg.data.dataset) == (model, experts, "folder")


@pytest.mark.parametrize(
    "env_extra,message",
    [
        (dict(VAE_PATH="/models/vae"), "set FEATURES_PATH"),
        (dict(FEATURES_PATH="/data/latents"), "set VAE_PATH"),
        (dict(FEATURES_PATH="/data/latents", VAE_PATH="/v", HOSTFILE="/no/such/hostfile"), "does not exist"),
    ],
)
def test_missing_settings_stop_with_one_sentence(fake_deepspeed, env_extra, message):
    bin_dir, record = fake_deepspeed
    proc = run_script("train_xl_rf.sh", env_extra, bin_dir)
    assert proc.returncode == 2 and message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not record.exists()


def test_a_fast_dit_feature_folder_is_read_as_npy_features(fake_deepspeed, tmp_path):
    bin_dir, record = fake_deepspeed
    (tmp_path / "imagenet256_features").mkdir()
    proc = run_script(
        "train_s.sh", dict(FEATURES_PATH=str(tmp_path), VAE_PATH="/models/vae"), bin_dir, "--num-classes", "1000"
    )
    assert proc.returncode == 0, proc.stderr
    argv = record.read_text().split("\n")[:-1]
    assert load_config(argv[argv.index("train_deepspeed.py") + 1 :]).data.dataset == "npy"
