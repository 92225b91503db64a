"""The command-line toolkit every entry point shares: flag spellings, value parsers, dtypes, the
default device, the launcher's environment, and the one error path (one line on stderr, exit 2).

    parser.add_argument(*flag("cfg-scale"), type=float)      # --cfg-scale and --cfg_scale
    sys.exit(run_main(lambda: work(args), prog="sample.py"))
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Optional

import torch

from .utils.errors import EXIT_USER_ERROR, UserError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
WEIGHTS = ("ema", "raw")  # which of a checkpoint's weight sets a tool reads


def flag(name: str) -> tuple[str, ...]:
    """Both spellings of a flag: `flag("cfg-scale")` -> ("--cfg-scale", "--cfg_scale"); one for one word."""
    dashed = name.replace("_", "-")
    return tuple(dict.fromkeys((f"--{dashed}", f"--{dashed.replace('-', '_')}")))


def parse_bool(text: str) -> bool:
    """True/False as DiT-MoE spells it (`--rf True`), also 1/0, yes/no, on/off, any case."""
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "y", "on"):
        return True
    if value in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


def parse_int_list(text: str) -> list[int]:
    """Integers from "0,1,2" (spaces allowed); at least one."""
    try:
        values = [int(part) for part in str(text).split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers such as 0,1,2, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer, e.g. 0,1,2")
    return values


def parse_optional_int_list(text: str) -> Optional[list[int]]:
    """`parse_int_list`, with "", "none" and "all" meaning None (e.g. every block)."""
    if str(text).strip().lower() in ("", "none", "all"):
        return None
    return parse_int_list(text)


def default_device(local_rank: int = 0) -> torch.device:
    """This process's GPU when CUDA is available, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def user_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean bad input: their message is shown as one line, without a traceback."""
    return (UserError, ValueError, FileNotFoundError)


def print_error(prog: str, error: BaseException) -> None:
    """Print `prog: error: <one sentence>` on stderr."""
    message = " ".join(str(error).split()) or type(error).__name__
    print(f"{prog}: error: {message}", file=sys.stderr)


def exit_with_error(prog: str, error: BaseException) -> None:
    """Print `prog: error: <one sentence>` on stderr and exit with status 2."""
    print_error(prog, error)
    sys.exit(EXIT_USER_ERROR)


def run_main(work: Callable[[], Optional[int]], prog: Optional[str] = None) -> int:
    """Run an entry point's work; bad input ends with one line and exit 2, anything else propagates."""
    try:
        return work() or 0
    except user_errors() as err:
        exit_with_error(prog or os.path.basename(sys.argv[0]), err)
    return EXIT_USER_ERROR


def add_weights_flag(parser: argparse.ArgumentParser) -> None:
    """--weights ema|raw: the EMA (default) or the raw training weights of a file that holds both."""
    parser.add_argument(
        *flag("weights"),
        choices=WEIGHTS,
        default="ema",
        help="ema: the exponential moving average (default); raw: the training weights, e.g. of a short run "
        "whose EMA is still near its starting weights (files holding one set, as DiT's releases, have only that)",
    )
