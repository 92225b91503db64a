"""Command-line entry of the trainer (`train_deepspeed.py`, `python -m dit_moe.train`)."""

from __future__ import annotations

import logging
import os
import sys
from typing import Optional

from ..cli import print_error, user_errors
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
    from .startup_notices import hold_startup_notices

    hold_startup_notices()  # the removal's notice goes into the run's log (`loop.start`)
    if LaunchEnv.from_environ().local_rank == 0:
        remove_stale_run_files()
    try:
        _train(argv)
    except user_errors() as err:
        if first_to_report():
            print_error(PROG, err)
        _leave(EXIT_USER_ERROR)
    sys.exit(0)


def _leave(code: int) -> None:
    """Exit with `code`. A rank whose process group is up leaves without the interpreter's teardown, where
    gloo's threads can abort it: under load one rank of a two-rank start that stopped on a damaged shard
    died of SIGABRT ("terminate called without an active exception", launcher status 250 instead of 2)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
