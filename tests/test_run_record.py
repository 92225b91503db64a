"""What a checkpoint records is its run's truth (issue: a run stays the run it was): flags that were
not given take the recorded architecture and objective, flags that repeat them are fine, flags that
contradict them stop with one sentence naming both values and the way to start a new run."""

import json

import pytest
import torch

from dit_moe.checkpoint import layout, read_checkpoint_file, save_export
from dit_moe.diffusion import ObjectiveConfig
from dit_moe.train.checkpointer import ResumePoint, find_resume
from dit_moe.train.config import load_config
from dit_moe.train.loop import settled_config
from dit_moe.utils.errors import UserError

from tiny_dit import tiny_config, tiny_model

FLOW = ObjectiveConfig(objective="flow", flow_t_scale=1000.0, timestep_sampler="logit-normal")
STATES_FLOW = ("--rf", "True", "--flow-t-scale", "1000")  # what DiT-MoE's train_xl_rf.sh passes every time


@pytest.fixture
def flow_tag(tmp_path):
    """A tag's record as the trainer writes it: a DiT-T/2 4E2A rectified-flow run (config files only)."""
    tag = tmp_path / "run" / layout.CHECKPOINTS_DIR / layout.tag_for_step(2)
    tag.mkdir(parents=True)
    config = tiny_config(in_channels=3, num_experts=4, num_experts_per_tok=2)
    (tag / layout.CONFIG_FILE).write_text(json.dumps(config.to_dict()))
    (tag / layout.OBJECTIVE_CONFIG_FILE).write_text(json.dumps(FLOW.to_dict()))
    return tag


def _settle(tag, *flags):
    return settled_config(load_config(["--dataset", "digits", *flags]), ResumePoint(tag, None), None)


def test_a_forgotten_rf_on_resume_is_refused_naming_the_flags_that_continue_it(flow_tag):
    # today's code continued it as IDDPM; the objective is the one thing the weights do not fix
    with pytest.raises(
        UserError, match=r"trained with --rf True --flow-t-scale 1000.0, which this command does not say"
    ):
        _settle(flow_tag)
    with pytest.raises(UserError, match=r"trained with --flow-t-scale 1000.0.*add --flow-t-scale 1000.0 to continue"):
        _settle(flow_tag, "--rf", "True")


def test_a_forgotten_model_flag_takes_the_recorded_architecture_on_resume(flow_tag):
    cfg = _settle(flow_tag, *STATES_FLOW)  # no --model: the weights fix it
    assert (cfg.objective.objective, cfg.objective.flow_t_scale) == ("flow", 1000.0)
    assert (cfg.model.model, cfg.model.num_experts, cfg.model.num_experts_per_tok) == ("DiT-T/2", 4, 2)
    assert cfg.to_dict()["objective"]["objective"] == "flow"  # what config.yaml is written from


def test_the_saved_config_yaml_states_the_objective_and_export_only_needs_none(flow_tag, tmp_path):
    saved = tmp_path / "config.yaml"
    saved.write_text("objective:\n  objective: flow\n  flow_t_scale: 1000.0\n")
    cfg = settled_config(
        load_config(["--config", str(saved), "--dataset", "digits"]), ResumePoint(flow_tag, None), None
    )
    assert cfg.objective.objective == "flow"
    cfg = settled_config(load_config(["--export-only", "True"]), ResumePoint(flow_tag, None), None)
    assert (cfg.objective.objective, cfg.objective.flow_t_scale) == ("flow", 1000.0)


def test_a_contradicting_flag_on_resume_is_refused_with_both_values(flow_tag):
    with pytest.raises(UserError, match=r"--objective iddpm \(--rf False; it records flow\).*--init-from"):
        _settle(flow_tag, "--rf", "False")
    with pytest.raises(UserError, match=r"--flow-t-scale 1.0 \(it records 1000.0\)"):
        _settle(flow_tag, "--flow-t-scale", "1")
    with pytest.raises(UserError, match=r"--num-experts-per-tok 1 \(it records 2\)"):
        _settle(flow_tag, "--num-experts-per-tok", "1")
    with pytest.raises(UserError, match=r"--model DiT-S/2 \(it records DiT-T/2\)"):
        _settle(flow_tag, "--model", "DiT-S/2")


def test_repeating_the_record_is_fine_and_training_options_are_the_flags(flow_tag):
    cfg = _settle(flow_tag, *STATES_FLOW, "--model", "DiT-T/2", "--num_experts", "4", "--aux-loss-coef", "0.05")
    assert cfg.objective.objective == "flow" and cfg.model.aux_loss_coef == 0.05


def test_init_from_with_a_contradicting_model_is_refused_and_the_config_describes_the_file(tmp_path):
    model = tiny_model(in_channels=3, num_experts=4, num_experts_per_tok=2)
    path = save_export(tmp_path / "w.safetensors", model.config, model.state_dict(), objective=FLOW)
    contents = read_checkpoint_file(path)
    with pytest.raises(UserError, match=r"--model DiT-B/2 \(it records DiT-T/2\).*--init-from"):
        settled_config(load_config(["--init-from", str(path), "--model", "DiT-B/2"]), None, contents)
    cfg = settled_config(load_config(["--init-from", str(path)]), None, contents)
    assert (cfg.model.model, cfg.model.num_experts, cfg.objective.objective) == ("DiT-T/2", 4, "flow")


def test_resume_of_a_weights_file_points_to_init_from(tmp_path):
    weights = tmp_path / "dit_moe_s_8E2A.pt"
    weights.write_bytes(b"not read")
    cfg = load_config(["--resume", str(weights), "--results-dir", str(tmp_path / "run")])
    with pytest.raises(UserError, match=r"is a weights file.*--init-from .*dit_moe_s_8E2A.pt"):
        find_resume(cfg.run.resume, tmp_path / "run")


@pytest.mark.slow
def test_resume_applies_a_new_learning_rate_and_keeps_the_recorded_model(trained_run, tmp_path):
    import shutil

    from trainer_runs import run_train

    shutil.copytree(trained_run / layout.CHECKPOINTS_DIR, tmp_path / layout.CHECKPOINTS_DIR)
    run_train(tmp_path, "--max-steps", "5", "--lr", "0.5", "--resume", "auto", "--num_experts", "4")
    log = (tmp_path / "log.txt").read_text()
    assert "Learning rate 0.0001 from the checkpoint replaced by --lr 0.5." in log
    assert "DiT-T/2 4E2A" in log
    proc = run_train(tmp_path, "--max-steps", "6", "--resume", "auto", "--num_experts", "8", check=False)
    assert proc.returncode == 2 and "--num-experts 8 (it records 4)" in proc.stderr and "Traceback" not in proc.stderr


def test_weights_raw_samples_and_upcycles_the_training_weights(tmp_path):
    """--weights raw reaches the training weights of a file that also holds an EMA (sample.py, the FID
    sampler, routing and upcycle.py), for runs whose EMA is still near its starting weights."""
    from dit_moe.sampling import SamplingOptions, SamplingRequest, prepare_sampling
    from dit_moe.sampling.flags import request_from_args
    from dit_moe.sampling.grid import build_parser
    from dit_moe.upcycle import UpcycleRequest, upcycle_checkpoint, upcycle_moe_args

    raw, ema = tiny_model(in_channels=3, num_experts=4), tiny_model(in_channels=3, num_experts=4)
    both = save_export(tmp_path / "both.safetensors", raw.config, raw.state_dict(), ema.state_dict(), objective=FLOW)
    raw_only = save_export(tmp_path / "raw.safetensors", raw.config, raw.state_dict(), objective=FLOW)

    def images(path, weights):
        request = SamplingRequest(
            path, options=SamplingOptions(num_steps=2, cfg_scale=1.0), device="cpu", weights=weights
        )
        return prepare_sampling(request).sample([1, 2], [0, 1])

    assert torch.equal(images(both, "raw"), images(raw_only, "ema"))
    assert not torch.equal(images(both, "raw"), images(both, "ema"))
    assert request_from_args(build_parser().parse_args(["--ckpt", str(both), "--weights", "raw"])).weights == "raw"
    dense_raw, dense_ema = tiny_model(in_channels=3, num_experts=0), tiny_model(in_channels=3, num_experts=0)
    dense = save_export(
        tmp_path / "dense.safetensors", dense_raw.config, dense_raw.state_dict(), dense_ema.state_dict()
    )
    _, _, out = upcycle_checkpoint(UpcycleRequest(dense, tmp_path / "moe.pt", upcycle_moe_args(4, 2), weights="raw"))
    upcycled = read_checkpoint_file(out).state_dict
    assert torch.equal(upcycled["x_embedder.proj.weight"], dense_raw.state_dict()["x_embedder.proj.weight"])


def test_resume_takes_the_recorded_image_size_when_no_flag_gives_one(flow_tag):
    cfg = _settle(flow_tag, *STATES_FLOW)  # the tag's model takes 8x8 3-channel digits; the digits default is 32 px
    assert (cfg.data.image_size, cfg.data.channels) == (8, 3)
    assert _settle(flow_tag, *STATES_FLOW, "--image-size", "16").data.image_size == 16  # a flag given is the run's


@pytest.mark.slow
def test_export_only_works_from_the_checkpoint_alone_and_records_its_step(trained_run, tmp_path):
    """No model, data or objective flag: the tag's record says what to build; the export says its step and
    tag, and an export-only run never replaces a later export unless told to."""
    import shutil
    import subprocess
    import sys

    from trainer_runs import REPO, env

    shutil.copytree(trained_run / layout.CHECKPOINTS_DIR, tmp_path / layout.CHECKPOINTS_DIR)
    tag = tmp_path / layout.CHECKPOINTS_DIR / layout.tag_for_step(2)
    base = [sys.executable, "train_deepspeed.py", "--deepspeed_config", "config/zero2.json", "--export-only", "True"]

    def export_only(*flags):
        return subprocess.run([*base, *flags], cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)

    proc = export_only("--resume", str(tmp_path), "--results-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    export = read_checkpoint_file(tmp_path / "export.safetensors")
    assert export.run["step"] == 4 and export.run["source_tag"].endswith("step0000004") and export.run["vae"] is None
    assert export.model_config.num_experts == 4 and export.model_config.input_size == 8
    proc = export_only("--resume", str(tag), "--results-dir", str(tmp_path))
    assert proc.returncode == 2 and "holds step 4, later than step 2" in proc.stderr and "Traceback" not in proc.stderr
    proc = export_only("--resume", str(tag), "--results-dir", str(tmp_path), "--overwrite", "True")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_checkpoint_file(tmp_path / "export.safetensors").run["step"] == 2


def test_the_vae_and_scale_an_export_records_decode_its_samples(tmp_path):
    from dit_moe.sampling import SamplingOptions, SamplingRequest, prepare_sampling

    from test_vae import save_tiny_vae

    vae = str(save_tiny_vae(tmp_path / "vae"))
    model = tiny_model(in_channels=4, num_experts=0)
    record = {"step": 3, "source_tag": "step0000003", "vae": {"path": vae, "scale_factor": 0.5}}
    path = save_export(tmp_path / "m.safetensors", model.config, model.state_dict(), objective=FLOW, run=record)
    assert read_checkpoint_file(path).run == record

    def prepared(**request):
        options = SamplingOptions(num_steps=1, cfg_scale=1.0)
        return prepare_sampling(SamplingRequest(path, options=options, device="cpu", **request))

    recorded = prepared()  # no --vae-path: the export's VAE, decoding latents / 0.5 (not SD's / 0.18215)
    assert recorded.vae_path == vae and recorded.codec.scale_factor == 0.5
    assert prepared(vae_path=vae).codec.scale_factor == 0.5


@pytest.mark.slow
def test_a_non_default_vae_scale_is_recorded_by_the_trainers_export(tmp_path):
    import numpy as np
    from PIL import Image

    from test_vae import save_tiny_vae
    from trainer_runs import run_train

    vae = str(save_tiny_vae(tmp_path / "vae"))
    images = tmp_path / "images" / "cls0"
    images.mkdir(parents=True)
    for i in range(8):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(
            images / f"{i}.png"
        )
    data = ["--dataset", "folder", "--data-path", str(tmp_path / "images"), "--vae-path", vae, "--image-size", "16"]
    run_train(tmp_path / "run", *data, "--vae-scale-factor", "0.5", "--global-batch-size", "4", "--max-steps", "1")
    export = read_checkpoint_file(tmp_path / "run" / "export.safetensors")
    assert export.run["vae"] == {"path": vae, "scale_factor": 0.5} and export.run["step"] == 1


def test_the_starting_weights_share_of_the_ema_and_the_warning_when_it_dominates(tmp_path, caplog):
    """The ramp min(decay, (1+n)/(10+n)) telescopes to 1 / C(n + 9, 9); DiT's constant 0.9999 leaves
    0.9999**n. Sampling an EMA that is mostly its start says so and names --weights raw."""
    import math

    from dit_moe.sampling import SamplingOptions, SamplingRequest, prepare_sampling
    from dit_moe.train.engine import ema_start_share

    assert ema_start_share(500, 0.9999, 100_000) == pytest.approx(1 / math.comb(509, 9), rel=1e-9)
    assert ema_start_share(1749, 0.9999, 0) == pytest.approx(0.9999**1749)
    model = tiny_model(in_channels=3, num_experts=0)
    options = SamplingOptions(num_steps=1, cfg_scale=1.0)
    for share, warned in ((0.84, True), (1e-3, False)):
        record = {"step": 1749, "ema_start_share": share}
        path = save_export(
            tmp_path / f"{share}.safetensors", model.config, model.state_dict(), objective=FLOW, run=record
        )
        caplog.clear()
        prepare_sampling(SamplingRequest(path, options=options, device="cpu"))
        said = [r.getMessage() for r in caplog.records if "starting weights" in r.getMessage()]
        assert bool(said) == warned and (not warned or ("84%" in said[0] and "--weights raw" in said[0]))


@pytest.mark.slow
def test_a_500_step_quickstart_run_samples_digits_with_the_default_ema(quickstart_run, tmp_path):
    """The default EMA (0.9999 with its warm-up ramp) serves a short run: a classifier trained on real
    digits recognises its samples (before the ramp, such an EMA was still the random start: noise)."""
    from dit_moe.evaluation import DigitsScorer
    from dit_moe.sampling import SamplingOptions, SamplingRequest, prepare_sampling

    options = SamplingOptions(sampler="euler", num_steps=25, cfg_scale=1.5)
    prepared = prepare_sampling(SamplingRequest(quickstart_run / "export.safetensors", options=options, device="cpu"))
    labels = [i % 10 for i in range(200)]
    score = DigitsScorer.fit(seed=0, cache_dir=tmp_path).score(prepared.sample(labels, list(range(200))), labels)
    assert score["label_accuracy"] >= 0.8


def test_resume_takes_the_image_size_through_the_vaes_own_downsampling(flow_tag, tmp_path):
    """A 4-channel record on a folder run: image = latent side x the VAE's factor (2 for this tiny VAE)."""
    from test_vae import save_tiny_vae

    config = tiny_config(in_channels=4, num_experts=4, num_experts_per_tok=2)
    (flow_tag / layout.CONFIG_FILE).write_text(json.dumps(config.to_dict()))
    vae = save_tiny_vae(tmp_path / "vae")
    flags = ["--dataset", "folder", "--data-path", str(tmp_path), "--vae-path", vae, *STATES_FLOW]
    cfg = settled_config(load_config(flags), ResumePoint(flow_tag, None), None)
    assert cfg.data.image_size == 8 * 2


def _latent_tag(flow_tag, tmp_path, scale_factor):
    """The flow tag as a latent run on a tiny VAE that scaled its latents by `scale_factor`."""
    from test_vae import save_tiny_vae

    config = tiny_config(in_channels=4, num_experts=4, num_experts_per_tok=2)
    (flow_tag / layout.CONFIG_FILE).write_text(json.dumps(config.to_dict()))
    vae = save_tiny_vae(tmp_path / "vae")
    record = {"vae": {"path": vae, "scale_factor": scale_factor}, "ema_decay": 0.995, "ema_warmup_steps": 0}
    (flow_tag / layout.RUN_RECORD_FILE).write_text(json.dumps(record))
    return ["--dataset", "folder", "--data-path", str(tmp_path), "--vae-path", vae, *STATES_FLOW]


def test_resume_with_another_latent_scale_is_refused_and_the_recorded_one_continues(flow_tag, tmp_path):
    flags = _latent_tag(flow_tag, tmp_path, 0.13025)
    with pytest.raises(UserError, match=r"--vae-scale-factor 0.18215 \(it records 0.13025\)"):
        settled_config(load_config(flags), ResumePoint(flow_tag, None), None)
    cfg = settled_config(load_config([*flags, "--vae-scale-factor", "0.13025"]), ResumePoint(flow_tag, None), None)
    assert cfg.data.codec_record()["scale_factor"] == 0.13025


def test_export_only_records_the_tags_vae_and_ema_settings_not_the_flags(flow_tag, tmp_path):
    from dit_moe.train.loop import run_record

    _latent_tag(flow_tag, tmp_path, 0.13025)
    cfg = settled_config(load_config(["--export-only", "True"]), ResumePoint(flow_tag, None), None)
    record = run_record(cfg, ResumePoint(flow_tag, None))  # the flags alone say pixels and EMA 0.9999
    assert record["vae"]["scale_factor"] == 0.13025 and record["ema_decay"] == 0.995
    fresh = run_record(load_config(["--dataset", "digits"]), None)
    assert fresh["vae"] is None and fresh["ema_decay"] == load_config([]).run.ema_decay


def test_repeating_a_custom_width_run_s_command_is_fine_and_another_preset_is_refused(flow_tag):
    config = tiny_config(in_channels=3, num_experts=4, num_experts_per_tok=2, hidden_size=256, num_heads=4)
    (flow_tag / layout.CONFIG_FILE).write_text(json.dumps(config.to_dict()))
    cfg = _settle(flow_tag, *STATES_FLOW, "--model", "DiT-T/2", "--hidden-size", "256")  # the run's own command
    assert cfg.model.hidden_size == 256
    with pytest.raises(UserError, match=r"--model DiT-T/2 \(it records a custom architecture\)"):
        _settle(flow_tag, *STATES_FLOW, "--model", "DiT-T/2")  # the preset's width, 128
