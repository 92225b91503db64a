"""The results directory of one run: what marks it as holding a run, and the rule that a fresh
run never overwrites another's files.

    results/run/
        config.yaml  log.txt  metrics.jsonl  tensorboard/  loss_curve.png
        checkpoints/            (layout: dit_moe.checkpoint.layout)
        export.safetensors | export.pt
"""

from __future__ import annotations

import shutil
from pathlib import Path

RUN_FILES = (
    "metrics.jsonl",
    "export.safetensors",
    "export.pt",
    "checkpoints",
    "config.yaml",
    "log.txt",
    "tensorboard",
    "loss_curve.png",
)
# Files whose presence means a run was started here (log and config alone are written at start-up).
RUN_MARKERS = ("metrics.jsonl", "export.safetensors", "export.pt", "checkpoints")


def existing_run(results_dir: Path) -> list[str]:
    """The markers of an earlier run found in `results_dir` (empty: nothing to overwrite)."""
    found = []
    for name in RUN_MARKERS:
        path = results_dir / name
        if path.is_file() or (path.is_dir() and any(path.iterdir())):
            found.append(name)
    return found


def claim_results_dir(results_dir: Path, fresh: bool, overwrite: bool, rank: int) -> None:
    """Refuse a fresh run (no --resume) into a directory that holds a run, unless `overwrite`;
    with `overwrite`, rank 0 deletes the earlier run's files first. Called on every rank before
    any rank writes, so every rank makes the same decision."""
    if not fresh:
        return
    found = existing_run(results_dir)
    if not found:
        return
    if not overwrite:
        raise ValueError(
            f"--results-dir {results_dir} already holds a run ({', '.join(found)}); continue it with --resume auto, "
            "pick another --results-dir, or pass --overwrite True to delete that run and start afresh."
        )
    if rank == 0:
        for name in RUN_FILES:
            path = results_dir / name
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
