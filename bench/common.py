"""What the benchmarks share: the flags that choose the model, the config they build, and timing in turns."""

from __future__ import annotations

import argparse
from typing import Callable, TypeVar

from dit_moe.models import DiTConfig, preset_config

Result = TypeVar("Result")


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="DiT-S/2")
    parser.add_argument("--num-experts", type=int, default=8)
    parser.add_argument("--num-experts-per-tok", type=int, default=2)
    parser.add_argument("--input-size", type=int, default=32, help="latent side (256px images -> 32)")
    parser.add_argument("--in-channels", type=int, default=4)


def model_config(args: argparse.Namespace, **overrides) -> DiTConfig:
    """The --model preset with the flags' MoE shape and latent size, and `overrides`."""
    return preset_config(
        args.model,
        input_size=args.input_size,
        in_channels=args.in_channels,
        num_experts=args.num_experts,
        num_experts_per_tok=args.num_experts_per_tok,
        **overrides,
    )


def in_turns(runs: dict[str, Callable[[], Result]], repeats: int) -> dict[str, list[Result]]:
    """What each run returns (its own timing) over `repeats` rounds in which the runs take turns, so
    that a load change on a shared machine hits all of them alike and the ratios stay meaningful."""
    results: dict[str, list[Result]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            results[name].append(run())
    return results
