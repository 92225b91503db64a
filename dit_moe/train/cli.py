"""Command-line entry of the trainer (`train_deepspeed.py`, `python -m dit_moe.train`)."""

from __future__ import annotations

import sys
from typing import Optional

from ..cli import exit_with_error, user_errors
from ..utils.errors import EXIT_USER_ERROR
from ..utils.launch import LaunchEnv
from .config import load_config

PROG = "train_deepspeed.py"


def _train(argv: Optional[list[str]]) -> None:
    config = load_config(argv)
    from .loop import train  # imports DeepSpeed: only once the flags are known to be valid

    train(config)  # checks every input before it claims the results folder


def main(argv: Optional[list[str]] = None) -> None:
    """Parse flags and train; bad input (a flag, a file, a full disk) ends with one line on stderr and exit
    code 2, printed once per run: by the first rank to fail (`first_to_report`), the others exit quietly."""
    from .distributed import first_to_report, remove_stale_run_files

    if LaunchEnv.from_environ().local_rank == 0:
        remove_stale_run_files()
    try:
        _train(argv)
    except user_errors() as err:
        if first_to_report():
            exit_with_error(PROG, err)
        sys.exit(EXIT_USER_ERROR)
    sys.exit(0)
