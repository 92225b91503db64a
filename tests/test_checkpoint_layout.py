"""The checkpoint-directory layout: tag order, the `latest` fallback, and one path resolution shared by
`load_model` and `--resume` (a results dir, its checkpoints dir or a tag dir)."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dit_moe.checkpoint import CheckpointError, ObjectiveSource, layout, load_model, read_checkpoint_file
from dit_moe.checkpoint.load import load_checkpoint_model
from dit_moe.diffusion import ObjectiveConfig
from dit_moe.models import DiT_models
from dit_moe.utils.atomic import write_text

FIXTURE = Path(__file__).parent / "fixtures" / "checkpoints_v0"
TAG_RUN_RECORD = {"vae": {"path": "vae/sdxl", "scale_factor": 0.13025}, "ema_decay": 0.999, "ema_warmup_steps": 0}


def _write_tag(checkpoint_dir: Path, step: int, complete: bool = True) -> torch.nn.Module:
    """A tag as the trainer lays it out (EMA weights + configs), with its own random weights."""
    torch.manual_seed(step)
    model = DiT_models["DiT-T/2"](input_size=8, in_channels=3, num_classes=10, num_experts=2).eval()
    for param in model.parameters():
        param.data.normal_(0, 0.02)
    tag = layout.tag_for_step(step)
    tag_dir = checkpoint_dir / tag
    tag_dir.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tag_dir / layout.EMA_FILE))
    texts = layout.config_texts(
        model.config.to_dict(),
        ObjectiveConfig(noise_schedule="cosine").to_dict(),
        TAG_RUN_RECORD,
        layout.RunShape(1, 1, 2),
    )
    for name, text in texts.items():
        (tag_dir / name).write_text(text)
    if complete:
        layout.mark_complete(checkpoint_dir, tag, step)
    return model


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_tags_sort_by_step_and_incomplete_or_foreign_dirs_are_ignored(tmp_path):
    for step in (10_000_000, 2, 30):
        _write_tag(tmp_path, step)
    _write_tag(tmp_path, 40, complete=False)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / layout.COMPLETE_MARKER).write_text("1\n")
    assert layout.complete_tags(tmp_path) == ["step0000002", "step0000030", "step10000000"]
    assert layout.tag_for_step(30) == "step0000030"


def test_reader_falls_back_to_the_newest_complete_tag_when_latest_names_an_incomplete_one(tmp_path):
    ckpts = tmp_path / "checkpoints"
    _write_tag(ckpts, 2)
    newest_complete = _write_tag(ckpts, 4)
    _write_tag(ckpts, 6, complete=False)
    write_text(ckpts / layout.LATEST_FILE, "step0000006")  # a kill between the two writes of a save
    assert layout.latest_complete_tag(ckpts) == "step0000004"
    assert _same_weights(load_model(ckpts), newest_complete)
    (ckpts / layout.LATEST_FILE).unlink()  # no pointer at all: the same fallback
    assert _same_weights(load_model(ckpts), newest_complete)


def test_results_checkpoints_and_tag_dirs_resolve_alike_for_load_model_and_resume(tmp_path):
    ckpts = tmp_path / "checkpoints"
    _write_tag(ckpts, 2)
    latest = _write_tag(ckpts, 4)
    for path in (tmp_path, ckpts, ckpts / "step0000004"):
        assert layout.resolve_tag_dir(path) == ckpts / "step0000004"  # what --resume PATH uses
        assert _same_weights(load_model(path), latest), path
    assert _same_weights(load_model(ckpts / "step0000002"), _write_tag(tmp_path / "other", 2))


def test_an_incomplete_tag_is_ignored_even_when_named_directly(tmp_path):
    _write_tag(tmp_path, 2, complete=False)
    assert layout.resolve_tag_dir(tmp_path / "step0000002") is None and layout.resolve_tag_dir(tmp_path) is None
    with pytest.raises(CheckpointError, match="not a DeepSpeed checkpoint"):
        load_model(tmp_path / "step0000002")


def test_the_objective_config_is_read_back_beside_the_model_config(tmp_path):
    _write_tag(tmp_path / "checkpoints", 2)
    assert read_checkpoint_file(tmp_path).trained_as.recorded == ObjectiveConfig(noise_schedule="cosine")
    assert layout.read_objective_config(layout.resolve_tag_dir(FIXTURE)) is None  # written before objective configs
    assert read_checkpoint_file(FIXTURE).trained_as.source is ObjectiveSource.LEGACY
    assert load_model(FIXTURE).config.num_experts > 0


def test_a_tag_records_its_vae_for_sampling_and_older_tags_record_none(tmp_path):
    _write_tag(tmp_path / "checkpoints", 2)
    assert read_checkpoint_file(tmp_path).run["vae"] == TAG_RUN_RECORD["vae"]  # what sampling decodes with
    assert load_checkpoint_model(tmp_path).run["vae"]["scale_factor"] == 0.13025
    assert read_checkpoint_file(FIXTURE).run == {}  # written before tags recorded their run


def test_writes_leave_no_temporary_files(tmp_path):
    _write_tag(tmp_path, 2)
    assert sorted(p.name for p in (tmp_path / "step0000002").iterdir()) == sorted(
        [layout.EMA_FILE, layout.CONFIG_FILE, layout.OBJECTIVE_CONFIG_FILE, layout.RUN_RECORD_FILE]
        + [layout.COMPLETE_MARKER, layout.SHAPE_FILE]
    )
    assert (tmp_path / layout.LATEST_FILE).read_text() == "step0000002"
