"""`python -m dit_moe.models`: the presets `--model` accepts, with their sizes.

Parameter counts are for 256 px ImageNet (32x32x4 latents, 1,000 classes, learned sigma), dense and
with DiT-MoE's default MoE shape (8 experts, top-2, one shared expert of width 2 x hidden); the
models are built on the meta device, so listing costs no memory.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

import torch

from ..cli import flag
from . import MODEL_SIZES, DiT_models, preset_config
from .dit import DiT


def parameter_count(name: str, **overrides) -> int:
    """Parameters of preset `name` with DiTConfig / MoE overrides, counted without allocating them."""
    with torch.device("meta"):
        return sum(p.numel() for p in DiT(preset_config(name, **overrides)).parameters())


def preset_table(num_experts: int = 8, num_experts_per_tok: int = 2) -> list[str]:
    """One line per preset: depth, width, heads, patch, dense and MoE parameter counts."""
    moe = f"{num_experts}E{num_experts_per_tok}A"
    lines = [f"{'preset':10} {'depth':>5} {'width':>5} {'heads':>5} {'patch':>5} {'dense':>9} {moe:>9}"]
    for name in DiT_models:
        size, patch = name[len("DiT-") :].split("/")
        depth, hidden, heads = MODEL_SIZES[size]
        dense = parameter_count(name, num_experts=0)
        routed = parameter_count(name, num_experts=num_experts, num_experts_per_tok=num_experts_per_tok)
        lines.append(f"{name:10} {depth:5d} {hidden:5d} {heads:5d} {patch:>5} {dense / 1e6:8.1f}M {routed / 1e6:8.1f}M")
    return lines


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dit_moe.models", description=__doc__.split("\n\n")[0])
    parser.add_argument(*flag("num-experts"), type=int, default=8, help="experts of the MoE column (default 8)")
    parser.add_argument(*flag("num-experts-per-tok"), type=int, default=2, help="top-k of the MoE column (default 2)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    print("\n".join(preset_table(args.num_experts, args.num_experts_per_tok)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
