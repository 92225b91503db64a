"""Command-line entry of the trainer (`train_deepspeed.py`, `python -m dit_moe.train`)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

from ..cli import run_main
from ..utils.launch import LaunchEnv
from .config import load_config
from .results import claim_results_dir


def _train(argv: Optional[list[str]]) -> None:
    config = load_config(argv)
    run = config.run
    claim_results_dir(
        Path(run.results_dir),
        fresh=run.resume is None and not run.export_only,
        overwrite=run.overwrite,
        rank=LaunchEnv.from_environ().rank,
    )
    from .loop import train  # imports DeepSpeed: only once the flags are known to be valid

    train(config)


def main(argv: Optional[list[str]] = None) -> None:
    """Parse flags and train; a configuration mistake ends with one line on stderr and exit code 2."""
    sys.exit(run_main(lambda: _train(argv), prog="train_deepspeed.py"))
