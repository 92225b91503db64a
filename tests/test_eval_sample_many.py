"""Sharded, resumable sampling with per-sample seeds, and the shared `sample_images` path."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dit_moe.checkpoint import load_model
from dit_moe.data.vae import PixelCodec
from dit_moe.diffusion import ObjectiveConfig
from dit_moe.evaluation.npz import png_name, read_npz
from dit_moe.sampling import SamplingOptions, build_sampling_objective, per_sample_noise, sample_images, sample_labels
from dit_moe.sampling.many import default_npz_path, main, shard_indices

from trainer_runs import free_port

FLOW = ObjectiveConfig(objective="flow")

REPO = Path(__file__).resolve().parents[1]
NUM_SAMPLES = 5  # odd: the two ranks get uneven shards


@pytest.fixture(scope="module")
def ckpt(tiny_export):
    """A flow model on 8x8 RGB pixels: the suite's tiny export."""
    return tiny_export


@pytest.fixture(scope="module")
def single_run(ckpt, tmp_path_factory):
    """A one-process run (batch 4): its folder and what its .npz held before any test touched the folder."""
    out = tmp_path_factory.mktemp("single") / "run"
    return out, read_npz(_sample(_args(ckpt, out, "--batch-size", "4")))


def _args(ckpt, out, *extra):
    return [
        "--ckpt",
        str(ckpt),
        "--num-samples",
        str(NUM_SAMPLES),
        "--out",
        str(out),
        "--num-sampling-steps",
        "2",
        "--cfg-scale",
        "1.5",
        "--seed",
        "7",
        "--device",
        "cpu",
        *extra,
    ]


def _sample(argv):
    """main(argv) in-process; it must succeed. Returns the .npz it wrote (OUT.npz)."""
    assert main(argv) == 0
    return default_npz_path(Path(argv[argv.index("--out") + 1]))


def _fails(capsys, argv) -> str:
    """main(argv) must exit 2 with one line on stderr; returns that line."""
    capsys.readouterr()  # drop what earlier runs printed
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1, err
    return err


def test_noise_and_labels_depend_only_on_the_sample():
    full = per_sample_noise([10, 11, 12, 13], (3, 4, 4))
    np.testing.assert_array_equal(per_sample_noise([12, 10], (3, 4, 4)).numpy(), full[[2, 0]].numpy())
    assert not torch.equal(full[0], full[1])
    np.testing.assert_array_equal(sample_labels(range(12), 10), np.arange(12) % 10)
    random = sample_labels(range(50), 10, seed=3, mode="random")
    np.testing.assert_array_equal(sample_labels([40, 7], 10, seed=3, mode="random"), random[[40, 7]])
    assert len(set(random.tolist())) > 5


def test_bad_input_stops_with_one_sentence(ckpt, tmp_path, capsys):
    assert "does not exist" in _fails(capsys, _args(tmp_path / "missing.pt", tmp_path / "out"))
    assert "use --sampler euler or heun" in _fails(capsys, _args(ckpt, tmp_path / "out", "--sampler", "ddpm"))
    # the file records flow: an --objective contradicting it is refused, not obeyed
    err = _fails(capsys, _args(ckpt, tmp_path / "out", "--objective", "iddpm", "--sampler", "euler"))
    assert "trained with rectified flow but --objective iddpm" in err
    assert not (tmp_path / "out" / "sampling.json").exists()


def test_shards_cover_every_index_once():
    shards = [shard_indices(11, r, 3) for r in range(3)]
    assert sorted(sum(shards, [])) == list(range(11))


def test_sample_images_is_batch_invariant_for_ode_samplers(ckpt):
    model = load_model(ckpt)
    options = SamplingOptions(sampler="euler", num_steps=2, cfg_scale=2.0)
    flow = build_sampling_objective(model.config, FLOW)
    together = sample_images(model, PixelCodec(3), [1, 2, 3], [5, 6, 7], options, objective=flow)
    alone = sample_images(model, PixelCodec(3), [3], [7], options, objective=flow)
    assert together.shape == (3, 3, 8, 8) and together.abs().max() <= 1
    torch.testing.assert_close(together[2:], alone, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="codec has 1 channels"):
        sample_images(model, PixelCodec(1), [0], [0], options, objective=flow)


def test_resume_skips_existing_pngs(ckpt, single_run, capsys):
    out, first = single_run
    assert first.images.shape == (NUM_SAMPLES, 8, 8, 3)
    np.testing.assert_array_equal(first.labels, np.arange(NUM_SAMPLES) % 10)
    assert len({img.tobytes() for img in first.images}) == NUM_SAMPLES
    (out / png_name(4)).unlink()
    marker = np.zeros((8, 8, 3), np.uint8)
    Image.fromarray(marker).save(out / png_name(1))  # an existing PNG must be kept, not redrawn
    second = read_npz(_sample(_args(ckpt, out, "--batch-size", "4")))
    np.testing.assert_array_equal(second.images[1], marker)
    np.testing.assert_array_equal(second.images[4], first.images[4])
    assert "other settings" in _fails(capsys, _args(ckpt, out, "--batch-size", "4", "--cfg-scale", "3.0"))


@pytest.mark.multiproc
def test_two_processes_match_one_process(ckpt, single_run, tmp_path):
    single = single_run[1]
    out = tmp_path / "sharded"
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = dict(
            os.environ,
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE="2",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
            OMP_NUM_THREADS="1",
            PYTHONPATH=str(REPO),
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "dit_moe.sampling.many", *_args(ckpt, out, "--batch-size", "2")],
                env=env,
                cwd=REPO,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    for proc in procs:
        output, _ = proc.communicate(timeout=240)
        assert proc.returncode == 0, output
    sharded = read_npz(out.with_name("sharded.npz"))
    assert sorted(p.name for p in out.glob("*.png")) == [png_name(i) for i in range(NUM_SAMPLES)]
    assert len({img.tobytes() for img in sharded.images}) == NUM_SAMPLES
    np.testing.assert_array_equal(sharded.labels, single.labels)
    # same seeds -> same images; batched kernels may round a pixel differently
    assert np.abs(sharded.images.astype(int) - single.images.astype(int)).max() <= 1
