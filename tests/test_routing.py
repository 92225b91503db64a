"""Routing analysis: recorded routing equals a routing known by construction, recording changes no
output, hooks go away, chunks spill to disk, bad routing files fail in one sentence, plots and CLIs run."""

import dataclasses
import json
import runpy
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from dit_moe.checkpoint import save_export
from dit_moe.data.vae import PixelCodec
from dit_moe.diffusion import ObjectiveConfig, guided
from dit_moe.models import DiT, MoEArgs
from dit_moe.models.moe import MoEFeedForward
from dit_moe.routing import (
    RoutingFile,
    RoutingFileError,
    RoutingRecorder,
    RoutingRequest,
    analyse_routing,
    class_heatmap,
    count_routing,
    load_counts,
    panel_axes,
    patch_dominant_heatmap,
    patch_expert_heatmap,
    step_heatmap,
    summarize,
)
from dit_moe.routing.plots import timestep_bins
from dit_moe.sampling import SamplingOptions, SamplingRequest, build_sampling_objective, sample_images

from tiny_dit import tiny_config, tiny_model

REPO = Path(__file__).resolve().parents[1]
E, K, C = 4, 2, 8  # experts, top-k, hidden width of the bare MoE layer
NUM_CLASSES, GRID = 3, (2, 2)
TIMESTEPS = [900.0, 500.0, 100.0]


# -- a bare MoE layer whose routing is a known function of (label, position, step) -------------


def known_choice(label: int, position: int, step: int) -> tuple[int, int]:
    """First and second expert of a token, by construction."""
    first = (label + position + step) % E
    return first, (first + 1 + label % 3) % E


def known_layer() -> MoEFeedForward:
    """Router logits = the first E input coordinates, so a token's top-2 is its two largest ones."""
    moe = MoEFeedForward(C, C, MoEArgs(num_experts=E, num_experts_per_tok=K, n_shared_experts=0))
    with torch.no_grad():
        moe.gate.weight.zero_()
        moe.gate.weight[:, :E] = torch.eye(E)
    return moe.eval()


def known_tokens(labels, step: int, positions=None) -> torch.Tensor:
    """[N, T, C] tokens with 3 at the first and 1.5 at the second expert's coordinate."""
    positions = positions if positions is not None else [list(range(GRID[0] * GRID[1]))] * len(labels)
    x = torch.zeros(len(labels), len(positions[0]), C)
    for n, label in enumerate(labels):
        for i, p in enumerate(positions[n]):
            first, second = known_choice(label, p, step)
            x[n, i, first], x[n, i, second] = 3.0, 1.5
    return x


LABELS = [0, 1, 2, NUM_CLASSES]  # the last sample carries the null label


def record_known(**recorder_options) -> RoutingRecorder:
    moe = known_layer()
    rec = RoutingRecorder(moe, num_classes=NUM_CLASSES, grid_size=GRID, **recorder_options)
    with torch.no_grad(), rec:
        for step, t in enumerate(TIMESTEPS):
            rec.set_context(labels=torch.tensor(LABELS), timestep=t, step=step)
            moe(known_tokens(LABELS, step))
    return rec


def expected_counts(labels):
    P, U = GRID[0] * GRID[1], len(TIMESTEPS)
    by_class, by_position, by_step = np.zeros((NUM_CLASSES + 1, E)), np.zeros((P, E)), np.zeros((U, E))
    for step in range(U):
        for label in labels:
            for p in range(P):
                for e in known_choice(label, p, step):
                    by_class[label, e] += 1
                    by_position[p, e] += 1
                    by_step[U - 1 - step, e] += 1  # counts rows are sorted by increasing timestep
    return by_class, by_position, by_step


def test_recorded_counts_equal_the_known_routing():
    rec = record_known()
    data = rec.arrays()
    P = GRID[0] * GRID[1]
    assert data["ids"].shape == (3 * 3 * P, 1, K) and data["ids"].dtype == np.uint8
    assert data["weights"].dtype == np.float16
    assert NUM_CLASSES not in data["label"]  # the null-label sample is dropped by default
    for row in range(len(data["label"])):
        expected = known_choice(int(data["label"][row]), int(data["position"][row]), int(data["step"][row]))
        assert tuple(data["ids"][row, 0]) == expected
    np.testing.assert_array_equal(np.unique(data["timestep"]), sorted(TIMESTEPS))
    counts = count_routing(rec.chunks(), rec.metadata())
    by_class, by_position, by_step = expected_counts(LABELS[:-1])
    np.testing.assert_array_equal(counts.by_class[0], by_class)
    np.testing.assert_array_equal(counts.by_position[0], by_position)
    np.testing.assert_array_equal(counts.by_timestep[0], by_step)
    np.testing.assert_array_equal(counts.tokens_by_position, [3 * 3] * P)  # kept samples x steps
    rec.close()


def test_uncond_rows_are_kept_with_the_null_label_when_asked():
    rec = record_known(record_uncond=True)
    counts = count_routing(rec.chunks(), rec.metadata())
    np.testing.assert_array_equal(counts.by_class[0], expected_counts(LABELS)[0])
    assert counts.tokens_by_class[NUM_CLASSES] == 3 * GRID[0] * GRID[1]


def test_gate_weights_are_the_router_softmax():
    data = record_known().arrays()
    logits = torch.tensor([3.0, 1.5, 0.0, 0.0])
    top = torch.topk(logits.softmax(-1), 2).values.numpy().astype(np.float16)
    np.testing.assert_array_equal(data["weights"][:, 0], np.broadcast_to(top, data["weights"][:, 0].shape))


def test_chunks_spill_past_the_threshold_and_read_back_the_same(tmp_path):
    in_memory = record_known().arrays()
    rec = record_known(max_memory_mb=1e-6, spill_dir=tmp_path / "spill")
    assert len(rec.chunk_files) == len(TIMESTEPS)  # every forward passes the tiny threshold
    assert all(path.is_file() for path in rec.chunk_files)
    spilled = rec.arrays()
    for key, value in in_memory.items():
        np.testing.assert_array_equal(spilled[key], value)
    path = rec.save(tmp_path / "routing.npz", note="spilled")
    with RoutingFile(path) as routing:
        assert routing.num_rows == len(in_memory["label"]) and routing.meta["note"] == "spilled"
        read = {k: np.concatenate([c[k] for c in routing.chunks(rows=5)]) for k in routing.arrays}
    for key, value in in_memory.items():
        np.testing.assert_array_equal(read[key], value)
    assert not list(tmp_path.glob(".*tmp*"))  # dit_moe.utils.atomic's temporary names


def test_temporary_spill_folder_is_removed_on_close():
    rec = record_known(max_memory_mb=1e-6)
    folder = rec.chunk_files[0].parent
    assert folder.is_dir()
    rec.close()
    assert not folder.exists()


def test_variable_token_counts_record_the_given_positions():
    moe = known_layer()
    positions = [[0, 2, 3], [1, 2, 3]]
    with torch.no_grad(), RoutingRecorder(moe, num_classes=NUM_CLASSES, grid_size=GRID) as rec:
        rec.set_context(labels=[1, 2], positions=torch.tensor(positions), step=0)
        moe(known_tokens([1, 2], 0, positions))
        rec.set_context(positions=None)
        moe(known_tokens([1, 2], 0)[:, :3])  # without positions: 0..T'-1
    data = rec.arrays()
    np.testing.assert_array_equal(data["position"], [0, 2, 3, 1, 2, 3, 0, 1, 2, 0, 1, 2])
    for row in range(6):
        assert tuple(data["ids"][row, 0]) == known_choice(int(data["label"][row]), int(data["position"][row]), 0)


def test_flat_router_input_splits_tokens_by_the_number_of_labels():
    moe = known_layer()
    with torch.no_grad(), RoutingRecorder(moe) as rec:  # no class count or grid given: inferred from the rows
        rec.set_context(labels=[2, 1], step=1)
        moe.gate(known_tokens([2, 1], 1).reshape(-1, C))  # [M, C] with M = 2 samples x 4 tokens
        with pytest.raises(RuntimeError, match="do not split into 3 samples"):
            rec.set_context(labels=[0, 1, 2])
            moe.gate(torch.zeros(8, C))
    data = rec.arrays()
    np.testing.assert_array_equal(data["label"], [2] * 4 + [1] * 4)
    np.testing.assert_array_equal(data["position"], [0, 1, 2, 3] * 2)
    meta = rec.metadata()
    assert meta["num_classes"] == 3 and meta["num_positions"] == 4 and meta["grid_size"] is None
    assert count_routing(rec.chunks(), meta).by_position.shape == (1, 4, E)


def test_missing_labels_or_mismatched_positions_fail_clearly():
    moe = known_layer()
    with torch.no_grad(), RoutingRecorder(moe) as rec:
        with pytest.raises(RuntimeError, match="set_context\\(labels"):
            moe(known_tokens([0], 0))
        rec.set_context(labels=[0], positions=[0, 1])
        with pytest.raises(RuntimeError, match="positions of shape"):
            moe(known_tokens([0], 0))


# -- a whole DiT ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dit():
    """DiT-T/2 on 8x8 pixels (4x4 patches) with random weights everywhere, so every block matters."""
    torch.manual_seed(0)
    return tiny_model(in_channels=3, num_experts=4, num_experts_per_tok=2)


def test_recording_changes_no_output_and_removes_its_hooks(dit):
    x, t, y = torch.randn(3, 3, 8, 8), torch.rand(3), torch.tensor([1, 2, 3])
    with torch.no_grad():
        plain = dit(x, t, y)
        with RoutingRecorder(dit) as rec:
            recorded = dit(x, t, y)
            assert all(len(dit.blocks[i].moe.gate._forward_hooks) == 1 for i in dit.moe_blocks)
    assert torch.equal(plain, recorded)
    assert rec.num_rows == 3 * 16
    assert all(not dit.blocks[i].moe.gate._forward_hooks for i in dit.moe_blocks)
    assert not dit._forward_pre_hooks and not dit._forward_hooks
    with pytest.raises(KeyError), RoutingRecorder(dit):
        raise KeyError("boom")
    assert all(not dit.blocks[i].moe.gate._forward_hooks for i in dit.moe_blocks) and not dit._forward_pre_hooks


def test_cfg_batch_is_tagged_from_the_model_inputs(dit):
    x, t, y = torch.randn(3, 3, 8, 8), torch.full((3,), 0.25), torch.tensor([4, 5, 6])
    fn = guided(dit, 1.5, null_label=10)
    with torch.no_grad():
        with RoutingRecorder(dit) as cond_only:
            fn(x, t, y)
        with RoutingRecorder(dit, record_uncond=True) as both:
            fn(x, t, y)
    np.testing.assert_array_equal(cond_only.arrays()["label"], np.repeat([4, 5, 6], 16))
    data = both.arrays()
    np.testing.assert_array_equal(data["label"], np.repeat([4, 5, 6, 10, 10, 10], 16))
    np.testing.assert_array_equal(data["position"], np.tile(np.arange(16), 6))
    np.testing.assert_array_equal(data["timestep"], np.full(6 * 16, 0.25, np.float32))  # from the model's t
    np.testing.assert_array_equal(data["ids"][: 3 * 16], cond_only.arrays()["ids"])
    for slot, block in enumerate(dit.moe_blocks):  # the layer's own token counter is an independent oracle
        counted = np.bincount(data["ids"][:, slot].reshape(-1), minlength=4)
        np.testing.assert_array_equal(counted, dit.blocks[block].moe.tokens_per_expert.numpy())


def test_sampling_with_the_recorder_gives_the_same_images(dit):
    codec, options = PixelCodec(3), SamplingOptions(sampler="euler", num_steps=2, cfg_scale=1.5)
    flow = build_sampling_objective(dit.config, ObjectiveConfig(objective="flow"))
    plain = sample_images(dit, codec, [1, 2], [0, 1], options, objective=flow)
    with RoutingRecorder(dit) as rec:
        tagged = sample_images(
            dit,
            codec,
            [1, 2],
            [0, 1],
            options,
            objective=flow,
            callback=lambda info: rec.set_context(timestep=info["t"], step=info["step"]),
        )
    assert torch.equal(plain, tagged)
    data = rec.arrays()
    np.testing.assert_array_equal(data["step"], np.repeat([0, 1], 2 * 16))
    assert rec.timesteps == [0.5, 1.0]


# -- statistics and plots -----------------------------------------------------------------------


def test_summary_of_a_handmade_routing():
    chunk = dict(
        ids=np.array([[[0], [0]], [[1], [0]], [[2], [0]], [[3], [0]]], np.uint8),
        label=np.zeros(4, np.int16),
        position=np.arange(4, dtype=np.int16),
        timestep=np.full(4, np.nan, np.float32),
        step=np.full(4, -1, np.int16),
    )
    meta = dict(num_experts=4, top_k=1, moe_layers=[2, 5], num_classes=1, grid_size=[2, 2], timesteps=[])
    summary = summarize(count_routing([chunk], meta))
    balanced, collapsed = summary["layers"]
    assert balanced["layer"] == 2 and balanced["load_share"] == [0.25] * 4
    assert balanced["cv"] == 0.0 and balanced["entropy"] == pytest.approx(1.0) and balanced["unused_experts"] == []
    assert collapsed["load_share"] == [1.0, 0.0, 0.0, 0.0] and collapsed["cv"] == pytest.approx(3**0.5)
    assert collapsed["entropy"] == pytest.approx(0.0) and collapsed["unused_experts"] == [1, 2, 3]


def test_timestep_bins_put_noisy_timesteps_first():
    index, labels = timestep_bins(np.array([0.25, 0.5, 1.0], np.float32), bins=10)
    assert list(index) == [2, 1, 0] and labels == ["1", "0.5", "0.25"]
    index, labels = timestep_bins(np.arange(20, dtype=np.float32), bins=4)
    assert len(labels) == 4 and index[19] == 0 and index[0] == 3 and np.bincount(index).tolist() == [5, 5, 5, 5]


def test_plots_have_one_panel_per_layer(dit):
    with torch.no_grad(), RoutingRecorder(dit) as rec:
        for step, t in enumerate([1.0, 0.5]):
            rec.set_context(step=step)
            dit(torch.randn(2, 3, 8, 8), torch.full((2,), t), torch.tensor([0, 7]))
    counts = count_routing(rec.chunks(), rec.metadata())
    layers = len(dit.moe_blocks)
    for plot in (class_heatmap, step_heatmap, patch_dominant_heatmap):
        fig = plot(counts)
        assert len(panel_axes(fig)) == layers and len(fig.axes) == layers + 1  # + the colour bar
        assert all(ax.get_title() and ax.get_xlabel() and ax.get_ylabel() for ax in panel_axes(fig))
    assert len(panel_axes(patch_expert_heatmap(counts))) == layers * 4
    assert len(panel_axes(class_heatmap(counts, layers=[1, 3]))) == 2
    assert class_heatmap(counts).axes[0].images[0].get_array().shape == (2, 4)  # classes 0 and 7 x experts
    with pytest.raises(RoutingFileError, match="MoE layer 9 is not in"):
        class_heatmap(counts, layers=[9])


# -- routing files ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def routing_file(tmp_path_factory):
    return record_known().save(tmp_path_factory.mktemp("routing") / "routing.npz")


def _rewrite(src: Path, dst: Path, drop=(), replace=None) -> Path:
    """Copy a routing file leaving out members `drop` and replacing members by {name: array or bytes}."""
    replace = replace or {}
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for name in zin.namelist():
            key = name[: -len(".npy")]
            if key in drop:
                continue
            if key in replace:
                with zout.open(name, "w") as fp:
                    np.lib.format.write_array(fp, replace[key])
            else:
                zout.writestr(name, zin.read(name))
    return dst


def _meta(path: Path) -> dict:
    with RoutingFile(path) as routing:
        return routing.meta


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing_file", "No routing file at"),
        ("truncated", "is truncated or not an .npz routing file"),
        ("missing_key", "lacks label"),
        ("wrong_shape", "has position of shape \\(7,\\)"),
        ("layer_mismatch", "holds 1 MoE layers but its metadata lists 2"),
        ("top_k_mismatch", "top_k=3"),
        ("bad_ids", "expert ids outside 0..3"),
    ],
)
def test_bad_routing_files_fail_in_one_sentence(routing_file, tmp_path, case, message):
    bad = tmp_path / "bad.npz"
    if case == "truncated":
        data = routing_file.read_bytes()
        bad.write_bytes(data[: len(data) // 2])
    elif case == "missing_key":
        _rewrite(routing_file, bad, drop=("label",))
    elif case == "wrong_shape":
        _rewrite(routing_file, bad, replace={"position": np.zeros(7, np.int16)})
    elif case in ("layer_mismatch", "top_k_mismatch"):
        meta = _meta(routing_file)
        meta.update(moe_layers=[0, 1]) if case == "layer_mismatch" else meta.update(top_k=3)
        _rewrite(routing_file, bad, replace={"meta": np.array(json.dumps(meta))})
    elif case == "bad_ids":
        with RoutingFile(routing_file) as routing:
            ids = np.concatenate([c["ids"] for c in routing.chunks()]) + 1
        _rewrite(routing_file, bad, replace={"ids": ids})
    with pytest.raises(RoutingFileError, match=message) as err:
        load_counts(bad)
    text = str(err.value)
    assert "\n" not in text and text.endswith(".") and text.count(". ") == 0


def test_cli_reports_a_bad_file_with_exit_status_2(tmp_path, monkeypatch, capsys):
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    monkeypatch.setattr(sys, "argv", ["heatmap_class.py", "--routing", str(tmp_path / "junk.npz"), "--out", "x.png"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(REPO / "analysis" / "heatmap_class.py"), run_name="__main__")
    assert exit_info.value.code == 2 and "truncated or not an .npz routing file" in capsys.readouterr().err


# -- end to end on a checkpoint ------------------------------------------------------------------


def _run_script(name: str, args: list, monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", [name, *map(str, args)])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(REPO / "analysis" / name), run_name="__main__")
    assert exit_info.value.code == 0


def test_analysis_scripts_run_on_a_checkpoint(tiny_export, tmp_path, monkeypatch, capsys):
    routing = tmp_path / "routing.npz"
    _run_script(
        "expert_data.py",
        [
            "--ckpt",
            tiny_export,
            "--out",
            routing,
            "--vae-path",
            "none",
            "--classes",
            "3,8",
            "--samples-per-class",
            "2",
            "--num-sampling-steps",
            "2",
            "--cfg-scale",
            "1.5",
            "--device",
            "cpu",
        ],
        monkeypatch,
    )
    # 2 guided steps: two rows per image each; printed as sample.py prints it and kept with the file
    assert f"{routing} (4 model evaluations per image, " in capsys.readouterr().out
    with RoutingFile(routing) as data:
        meta = data.meta
        assert data.num_rows == 2 * 2 * 2 * 16  # classes x samples x steps x patches (cond half only)
        assert data.shapes["ids"] == (data.num_rows, 6, 2)
    assert meta["classes"] == [3, 8] and meta["timesteps"] == [0.5, 1.0] and meta["grid_size"] == [4, 4]
    assert meta["num_experts"] == 4 and meta["top_k"] == 2 and meta["moe_layers"] == list(range(6))
    assert meta["sampling"]["sampler"] == "euler" and meta["sampling"]["cfg_scale"] == 1.5
    assert meta["ckpt"] == str(Path(tiny_export).resolve())
    assert meta["cost"].startswith("4 model evaluations per image")
    for script, extra in [
        ("heatmap_class.py", []),
        ("heatmap_step.py", ["--bins", "3"]),
        ("heatmap_patch.py", ["--mode", "dominant"]),
        ("heatmap_patch.py", ["--mode", "per-expert"]),
    ]:
        png = tmp_path / f"{script}{len(extra)}.png"
        _run_script(script, ["--routing", routing, "--out", png, *extra], monkeypatch)
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000
    _run_script("summary.py", ["--routing", routing, "--json", tmp_path / "summary.json"], monkeypatch)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert len(summary["layers"]) == 6 and all(abs(sum(l["load_share"]) - 1) < 1e-4 for l in summary["layers"])


def test_analyse_checkpoint_writes_everything(tiny_export, tmp_path):
    options = SamplingOptions(num_steps=2, cfg_scale=1.0)
    request = RoutingRequest(SamplingRequest(tiny_export, options=options), classes=[0, 1], samples_per_class=1)
    paths = analyse_routing(dataclasses.replace(request, progress=False), tmp_path / "out")
    assert set(paths) == {"routing", "class", "patch", "patch_experts", "step", "summary_json", "summary_txt"}
    assert all(Path(p).is_file() and Path(p).stat().st_size > 0 for p in paths.values())
    assert "entropy" in Path(paths["summary_txt"]).read_text()


def test_dense_checkpoint_is_refused(tmp_path):
    model = DiT(tiny_config(in_channels=3))
    ckpt = save_export(tmp_path / "dense.safetensors", model.config, model.state_dict())
    with pytest.raises(ValueError, match="dense DiT"):
        analyse_routing(RoutingRequest.for_checkpoint(ckpt, progress=False), tmp_path / "out")
