"""Merge what scripts/device_check.sh's steps wrote into one JSON and a short text summary.

    python bench/device_report.py WORK OUT --budget-s 510 --elapsed-s 432 [--dry-run]

WORK holds steps.tsv (name, status, seconds per step), cuda_tests.xml (pytest's junit report),
wheels.txt and train.json / moe.json / sample.json from the benchmarks; OUT gets device_check.json
and summary.txt. Every field of `FIELDS` is present in the JSON; a step that failed, timed out or
never ran leaves its fields null, and its status says why.
"""

from __future__ import annotations

import argparse
import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Optional

import torch

from dit_moe.models import flops

DRY_RUN_SKIP = "skipped: dry run"  # the wheels step's status in a dry run (scripts/device_check.sh)
STEPS = ("wheels", "cuda_tests", "train", "moe", "sample")
TRAIN_SETTINGS = ("plain", "grad-ckpt", "compiled", "compiled-grad-ckpt", "reference")
# A CPU dry run trains one compiled setting (a compile takes minutes there); scripts/device_check.sh's SETTINGS.
DRY_RUN_TRAIN_SETTINGS = ("plain", "compiled", "reference")
MOE_VARIANTS = ("grouped", "loop", "mask-loop", "mask-loop-tp1", "dense")
SAMPLE_VARIANTS = ("ours-eager", "reference-eager", "ours-compiled", "reference-compiled")
# The issue's goals for the GPU figures: >= 40% MFU in bf16 training, >= 1.5x the reference's images/s.
MFU_GOAL, REFERENCE_GOAL = 0.40, 1.5
# Fields (by last name) whose value only a GPU gives, null in a CPU dry run: CUDA's version, the device
# memory, the vendor peak and what is judged against it.
GPU_ONLY = ("cuda", "memory_gib", "vendor_bf16_peak_tflops", "mfu", "mfu_reached")
TRAIN_RATIOS = ("compiled_vs_eager", "eager_vs_reference", "best_vs_reference")
SAMPLE_RATIOS = ("eager", "compiled", "compiled_vs_eager")


def _fields() -> list[str]:
    """Dotted paths of every field of device_check.json."""
    fields = [
        "dry_run",
        "complete",
        "budget_s",
        "elapsed_s",
        "device.name",
        "device.torch",
        "device.cuda",
        "device.memory_gib",
        "device.vendor_bf16_peak_tflops",
        "wheels",
        "cuda_tests.passed",
        "cuda_tests.failed",
        "cuda_tests.skipped",
        "cuda_tests.failures",
    ]
    fields += [f"steps.{step}.{key}" for step in STEPS for key in ("status", "seconds")]
    fields += [
        f"train.{key}" for key in ("model", "precision", "batch_size", "params", "train_gflop_per_image", "gemm_tflops")
    ]
    fields += ["train.vendor_bf16_peak_tflops"]
    for name in TRAIN_SETTINGS:
        fields += [
            f"train.settings.{name}.{key}"
            for key in ("batch_size", "images_per_s", "step_s", "peak_mb", "tflops", "of_gemm", "mfu")
        ]
    fields += [f"train.settings.{name}.compile_s" for name in ("compiled", "compiled-grad-ckpt")]
    fields += [f"train.ratios.{key}" for key in TRAIN_RATIOS]
    fields += ["moe.hidden", "moe.tokens", "moe.ours", "moe.gemm_tflops"]
    for name in MOE_VARIANTS:
        fields += [f"moe.variants.{name}.{key}" for key in ("ms", "speedup_vs_mask_loop", "tflops", "of_gemm", "mfu")]
    fields += ["sample.batch_size", "sample.num_steps", "sample.gflop_per_image_step", "sample.gemm_tflops"]
    for name in SAMPLE_VARIANTS:
        fields += [f"sample.variants.{name}.{key}" for key in ("images_per_s", "tflops", "of_gemm", "mfu")]
    fields += [f"sample.variants.{name}.compile_s" for name in SAMPLE_VARIANTS if name.endswith("compiled")]
    fields += [f"sample.ratios.{key}" for key in SAMPLE_RATIOS]
    fields += ["goals.mfu", "goals.mfu_reached", "goals.images_per_s_vs_reference", "goals.reference_reached"]
    return fields


FIELDS = _fields()


def gpu_only(field: str) -> bool:
    return field.split(".")[-1] in GPU_ONLY


def not_in_dry_run(field: str) -> bool:
    """A field of a training setting that a CPU dry run leaves out."""
    parts = field.split(".")
    return parts[:2] == ["train", "settings"] and parts[2] not in DRY_RUN_TRAIN_SETTINGS


def get(tree: Any, path: str) -> Any:
    """`tree`'s value at a dotted path, None where any part is missing."""
    for key in path.split("."):
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def read_steps(path: Path) -> dict[str, dict]:
    steps = {step: {"status": "not run", "seconds": None} for step in STEPS}
    if path.is_file():
        for line in path.read_text().splitlines():
            name, status, seconds = line.split("\t")
            steps[name] = {"status": status, "seconds": float(seconds)}
    return steps


def read_junit(path: Path) -> dict:
    if not path.is_file():
        return {"passed": None, "failed": None, "skipped": None, "failures": None}
    cases = ET.parse(path).getroot().iter("testcase")
    outcome = {"passed": 0, "failed": 0, "skipped": 0}
    failures = []
    for case in cases:
        if case.find("skipped") is not None:
            outcome["skipped"] += 1
        elif case.find("failure") is not None or case.find("error") is not None:
            outcome["failed"] += 1
            failures.append(case.get("name"))
        else:
            outcome["passed"] += 1
    return {**outcome, "failures": failures}


def device_info() -> dict:
    cuda = torch.cuda.is_available()
    name = torch.cuda.get_device_name() if cuda else "CPU"
    peak = flops.vendor_peak(name) if cuda else None
    return {
        "name": name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "memory_gib": torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda else None,
        "vendor_bf16_peak_tflops": peak / 1e12 if peak else None,
    }


def train_section(raw: dict) -> dict:
    settings = {}
    for name in TRAIN_SETTINGS:
        r = get(raw, f"settings.{name}") or {}
        settings[name] = {
            "batch_size": r.get("batch_size"),
            "images_per_s": r.get("images_per_s"),
            "step_s": r["batch_size"] / r["images_per_s"] if r.get("images_per_s") else None,
            "peak_mb": r.get("peak_mb"),
            "compile_s": r.get("compile_s"),
            **{key: get(r, f"utilisation.{key}") for key in ("tflops", "of_gemm", "mfu")},
            "error": r.get("error"),
        }
    keys = ("model", "precision", "batch_size", "params", "train_gflop_per_image", "gemm_tflops")
    return {
        **{key: raw.get(key) for key in keys},
        "vendor_bf16_peak_tflops": raw.get("vendor_peak_tflops"),
        "settings": settings,
        "ratios": {key: get(raw, f"ratios.{key}") for key in TRAIN_RATIOS},
    }


def moe_section(raw: dict) -> dict:
    width = next(iter((raw.get("widths") or {}).values()), {})
    variants = {
        name: {
            "ms": get(width, f"ms.{name}"),
            "speedup_vs_mask_loop": get(width, f"speedup_vs_mask_loop.{name}"),
            **{key: get(width, f"utilisation.{name}.{key}") for key in ("tflops", "of_gemm", "mfu")},
        }
        for name in MOE_VARIANTS
    }
    return {
        "hidden": width.get("hidden"),
        "tokens": raw.get("tokens"),
        "ours": width.get("ours"),
        "gemm_tflops": raw.get("gemm_tflops"),
        "variants": variants,
    }


def sample_section(raw: dict) -> dict:
    variants = {
        name: {
            "images_per_s": get(raw, f"variants.{name}.images_per_s"),
            "compile_s": get(raw, f"variants.{name}.compile_s"),
            **{key: get(raw, f"variants.{name}.utilisation.{key}") for key in ("tflops", "of_gemm", "mfu")},
        }
        for name in SAMPLE_VARIANTS
    }
    keys = ("batch_size", "num_steps", "gflop_per_image_step", "gemm_tflops")
    ratios = {key: get(raw, f"ratios.{key}") for key in SAMPLE_RATIOS}
    return {**{key: raw.get(key) for key in keys}, "variants": variants, "ratios": ratios}


def goals(train: dict) -> dict:
    best_mfu = max((s["mfu"] for s in train["settings"].values() if s["mfu"] is not None), default=None)
    vs_reference = get(train, "ratios.best_vs_reference")
    return {
        "mfu": best_mfu,
        "mfu_reached": best_mfu >= MFU_GOAL if best_mfu is not None else None,
        "images_per_s_vs_reference": vs_reference,
        "reference_reached": vs_reference >= REFERENCE_GOAL if vs_reference is not None else None,
    }


def build_report(work: Path, dry_run: bool, budget_s: float, elapsed_s: float) -> dict:
    steps = read_steps(work / "steps.tsv")
    wheels = work / "wheels.txt"
    train = train_section(_read_json(work / "train.json"))
    return {
        "dry_run": dry_run,
        "complete": all(step["status"] in ("ok", DRY_RUN_SKIP) for step in steps.values()),
        "budget_s": budget_s,
        "elapsed_s": elapsed_s,
        "device": device_info(),
        "steps": steps,
        "wheels": wheels.read_text().split() if wheels.is_file() else [],
        "cuda_tests": read_junit(work / "cuda_tests.xml"),
        "train": train,
        "moe": moe_section(_read_json(work / "moe.json")),
        "sample": sample_section(_read_json(work / "sample.json")),
        "goals": goals(train),
    }


def _num(value: Optional[float], fmt: str = ".2f", scale: float = 1.0) -> str:
    return "not measured" if value is None else f"{value * scale:{fmt}}"


def summary(report: dict) -> str:
    device, train, moe, sample, goal = (report[k] for k in ("device", "train", "moe", "sample", "goals"))
    tests = report["cuda_tests"]
    lines = [
        f"device check{' (dry run, CPU, tiny sizes)' if report['dry_run'] else ''}: {device['name']}, torch"
        f" {device['torch']}, CUDA {device['cuda']}; {report['elapsed_s']:.0f} s of a {report['budget_s']:.0f} s budget",
        "steps: " + ", ".join(f"{name} {s['status']}" for name, s in report["steps"].items()),
        f"CUDA tests: {tests['passed']} passed, {tests['failed']} failed, {tests['skipped']} skipped"
        + (f"; failed: {', '.join(tests['failures'])}" if tests["failures"] else ""),
        f"training step, {train['model']} {train['precision']}, batch {train['batch_size']},"
        f" {_num(train['train_gflop_per_image'], '.0f')} GFLOP/image, square GEMM {_num(train['gemm_tflops'])} TFLOP/s:",
    ]
    for name, s in train["settings"].items():
        lines.append(
            f"  {name:>18}: {_num(s['images_per_s'])} images/s, {_num(s['tflops'], '.3f')} TFLOP/s,"
            f" {_num(s['of_gemm'], '.0%')} of GEMM, MFU {_num(s['mfu'], '.0%')}, peak {_num(s['peak_mb'], '.0f')} MB"
            + (f", compile {_num(s['compile_s'], '.0f')} s" if s["compile_s"] is not None else "")
        )
    ratios = train["ratios"]
    lines.append(
        f"  compiled vs eager {_num(ratios['compiled_vs_eager'])}x; vs the reference-style model: eager"
        f" {_num(ratios['eager_vs_reference'])}x, best {_num(ratios['best_vs_reference'])}x"
    )
    lines.append(
        f"MoE layer (C={moe['hidden']}, {moe['tokens']} tokens, ours = {moe['ours']}): "
        + ", ".join(f"{name} {_num(v['ms'])} ms" for name, v in moe["variants"].items())
    )
    lines.append(
        f"guided sampling (batch {sample['batch_size']}, {sample['num_steps']} steps): "
        + ", ".join(f"{name} {_num(v['images_per_s'])} images/s" for name, v in sample["variants"].items())
        + f"; ours vs reference eager {_num(sample['ratios']['eager'])}x,"
        f" compiled {_num(sample['ratios']['compiled'])}x"
    )
    lines.append(
        f"goals: MFU {_num(goal['mfu'], '.0%')} (goal {MFU_GOAL:.0%}), images/s vs the reference"
        f" {_num(goal['images_per_s_vs_reference'])}x (goal {REFERENCE_GOAL}x)"
    )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("work", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--budget-s", type=float, required=True)
    parser.add_argument("--elapsed-s", type=float, required=True)
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args()
    report = build_report(args.work, args.dry_run, args.budget_s, args.elapsed_s)
    (args.out / "device_check.json").write_text(json.dumps(report, indent=1) + "\n")
    text = summary(report)
    (args.out / "summary.txt").write_text(text)
    print(text, end="")


if __name__ == "__main__":
    main()
