"""Files written before the nested model config and the objective config still load and sample
identically (tests/fixtures, written by commit c79adc6), and a recorded noise schedule is used
without repeating the flag."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dit_moe.checkpoint import ObjectiveSource, load_checkpoint_model, read_checkpoint_file
from dit_moe.diffusion import ObjectiveConfig
from dit_moe.models import DiTConfig, MoEArgs
from dit_moe.sampling import SamplingOptions, SamplingRequest, build_sampling_objective, prepare_sampling, sample_images
from dit_moe.sampling.grid import sample_grid
from dit_moe.utils.errors import UserError

from trainer_runs import run_train

FIXTURES = Path(__file__).parent / "fixtures"
# What tests/fixtures/README.md's script sampled with, per file.
OLD_SAMPLING = {
    "export_v0_moe_flow.safetensors": SamplingOptions(num_steps=4, cfg_scale=1.5),
    "export_v0_dense_iddpm.pt": SamplingOptions(sampler="ddim", num_steps=5, cfg_scale=2.0, cfg_channels=3),
}


def test_flat_config_keys_remap_to_the_nested_config():
    flat = json.loads((FIXTURES / "checkpoints_v0" / "step0000004" / "dit_config.json").read_text())
    assert "num_experts" in flat and "moe" not in flat  # really the old layout
    config = DiTConfig.from_dict(flat)
    assert config.moe == MoEArgs(num_experts=4, num_experts_per_tok=2, n_shared_experts=2, moe_layers=[1])
    assert (config.hidden_size, config.depth, config.qk_norm) == (32, 2, True)
    assert DiTConfig.from_dict(config.to_dict()) == config  # the nested layout round-trips
    dense = DiTConfig.from_dict({k: v for k, v in flat.items()} | {"num_experts": 0})
    assert dense.moe is None


@pytest.mark.parametrize("path", ["export_v0_moe_flow.safetensors", "export_v0_dense_iddpm.pt", "checkpoints_v0"])
def test_old_files_load_with_their_recorded_objective(path):
    loaded = load_checkpoint_model(FIXTURES / path)
    expected = "iddpm" if "iddpm" in path else "flow"
    assert loaded.config_stored and loaded.trained_as.source is ObjectiveSource.LEGACY
    assert loaded.trained_as.recorded == ObjectiveConfig(objective=expected)
    assert (loaded.model.config.moe is None) == ("dense" in path)


@pytest.mark.parametrize("name", sorted(OLD_SAMPLING))
def test_old_exports_sample_as_they_did(tmp_path, name):
    expected = load_file(str(FIXTURES / "export_v0_samples.safetensors"))[name.split(".")[0]]
    grid = sample_grid(
        FIXTURES / name,
        tmp_path / "grid.png",
        class_labels=[0, 1, 2, 3],
        options=OLD_SAMPLING[name],
        seed=3,
        device="cpu",
    )
    torch.testing.assert_close(grid.images, expected, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_a_cosine_run_is_sampled_with_cosine_without_the_flag(tmp_path):
    run_train(
        tmp_path,
        "--max-steps",
        "2",
        "--global-batch-size",
        "8",
        "--num-experts",
        "0",
        "--noise-schedule",
        "cosine",
        "--diffusion-steps",
        "500",
    )
    export = tmp_path / "export.safetensors"
    assert read_checkpoint_file(export).trained_as.recorded.noise_schedule == "cosine"
    options = SamplingOptions(sampler="ddim", num_steps=5, cfg_scale=1.0)
    prepared = prepare_sampling(SamplingRequest(export, options=options, device="cpu"))
    assert (prepared.objective_config.noise_schedule, prepared.objective_config.diffusion_steps) == ("cosine", 500)
    images = prepared.sample([1, 2], [0, 1])

    def by_hand(schedule: str) -> torch.Tensor:
        objective = build_sampling_objective(
            prepared.config, ObjectiveConfig(noise_schedule=schedule, diffusion_steps=500)
        )
        return sample_images(prepared.model, prepared.codec, [1, 2], [0, 1], options, objective=objective)

    torch.testing.assert_close(images, by_hand("cosine"), atol=0, rtol=0)
    assert not torch.allclose(images, by_hand("linear"), atol=1e-3)
    with pytest.raises(UserError, match="--noise-schedule cosine, but --noise-schedule linear"):
        prepare_sampling(SamplingRequest(export, options=options, noise_schedule="linear", device="cpu"))
