"""Command-line entry of the trainer (`train_deepspeed.py`, `python -m dit_moe.train`)."""

from __future__ import annotations

import sys
from typing import Optional

from ..checkpoint import CheckpointError
from .config import load_config

USER_ERRORS = (ValueError, FileNotFoundError, CheckpointError)


def main(argv: Optional[list[str]] = None) -> None:
    """Parse flags and train; a configuration mistake ends with one line on stderr and exit code 2."""
    try:
        config = load_config(argv)
        from .loop import train  # imports DeepSpeed: only once the flags are known to be valid

        train(config)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
