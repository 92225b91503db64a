"""scripts/device_check.sh --dry-run: every step of the GPU check runs on the CPU at tiny sizes and the
report has every field; plus the report's pieces (batch fitting, junit counting) on their own."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from trainer_runs import REPO


def _bench_module(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(REPO / "bench"))  # bench scripts import their neighbours
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(REPO / "bench"))
    return module


device_report = _bench_module("device_report")
bench_train = _bench_module("train")


@pytest.mark.slow
def test_dry_run_passes_and_reports_every_field(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    env.pop("DS_ACCELERATOR", None)
    proc = subprocess.run(
        ["bash", "scripts/device_check.sh", "--dry-run", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    log = (out / "device_check.log").read_text() if (out / "device_check.log").is_file() else ""
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}\n{log[-6000:]}"
    assert sorted(p.name for p in out.iterdir()) == ["device_check.json", "device_check.log", "summary.txt"]
    report = json.loads((out / "device_check.json").read_text())
    missing = [field for field in device_report.FIELDS if device_report.get(report, field) is None]
    assert missing and all(device_report.gpu_only(f) or device_report.not_in_dry_run(f) for f in missing), missing
    assert report["dry_run"] and report["complete"]
    assert report["steps"]["wheels"]["status"] == "skipped: dry run"
    assert all(report["steps"][name]["status"] == "ok" for name in ("cuda_tests", "train", "moe", "sample"))
    tests = report["cuda_tests"]
    assert tests["failed"] == 0 and tests["passed"] >= 8 and tests["skipped"] == 1  # the sync test needs CUDA
    train = report["train"]
    assert train["batch_size"] == 4  # --batch-size auto, capped by --max-batch-size 4
    ran = {name: s for name, s in train["settings"].items() if s["images_per_s"] is not None}
    assert tuple(ran) == device_report.DRY_RUN_TRAIN_SETTINGS
    assert all(s["images_per_s"] > 0 and s["batch_size"] == 4 for s in ran.values())
    assert train["settings"]["compiled"]["compile_s"] > 0
    assert report["moe"]["ours"] == "loop"  # fp32 on the CPU
    assert "goals: MFU not measured" in (out / "summary.txt").read_text()


def test_fitting_batch_follows_the_line_through_the_probes():
    small, large = bench_train.PROBE_BATCHES
    gib = 2**30
    fixed, per_image = 60 * gib, 1.5 * gib
    peaks = (fixed + small * per_image, fixed + large * per_image)
    # 0.85 * 141 GiB = 119.85 GiB: (119.85 - 60) / 1.5 = 39.9 images -> 32, a multiple of 8
    assert bench_train.fitting_batch(peaks, 141 * gib, 512) == 32
    assert bench_train.fitting_batch(peaks, 141 * gib, 16) == 16
    assert bench_train.fitting_batch(peaks, 80 * gib, 512) == 5  # (68 - 60) / 1.5 = 5.3: below 8, not rounded
    assert bench_train.fitting_batch(peaks, 60 * gib, 512) == small  # nothing fits: the smaller probe


def test_rounds_report_each_settings_median_round_and_keep_a_failure():
    rounds = {
        "plain": [
            {"images_per_s": 3.0, "peak_mb": 1},
            {"images_per_s": 1.0, "peak_mb": 2},
            {"images_per_s": 2.0, "peak_mb": 3},
        ],
        "reference": [{"images_per_s": 1.0}, {"error": "worker failed"}],
    }
    out = bench_train.median_rounds(rounds)
    assert out["plain"] == {"images_per_s": 2.0, "peak_mb": 3, "rounds": 3}  # the whole median round, not a mix
    assert out["reference"] == {"error": "worker failed"}


def test_report_of_a_run_that_delivered_nothing_has_every_field(tmp_path):
    (tmp_path / "steps.tsv").write_text("wheels\tok\t3\ncuda_tests\ttimed out after 150 s\t150\n")
    (tmp_path / "cuda_tests.xml").write_text(
        '<testsuites><testsuite><testcase name="a"/><testcase name="b"><failure/></testcase>'
        '<testcase name="c"><skipped/></testcase></testsuite></testsuites>'
    )
    report = device_report.build_report(tmp_path, dry_run=False, budget_s=510, elapsed_s=200)
    assert all(_leaf_present(report, field) for field in device_report.FIELDS)
    assert report["cuda_tests"] == {"passed": 1, "failed": 1, "skipped": 1, "failures": ["b"]}
    assert report["steps"]["train"]["status"] == "not run" and not report["complete"]
    assert "not measured images/s" in device_report.summary(report)


def _leaf_present(tree, path: str) -> bool:
    *parents, leaf = path.split(".")
    for key in parents:
        tree = tree[key]
    return leaf in tree
