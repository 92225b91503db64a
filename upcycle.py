"""Upcycle a dense DiT checkpoint into a DiT-MoE checkpoint that starts where the dense model was.

    python upcycle.py --model DiT-S/2 --ckpt dense.pt --num_experts 8 --num_experts_per_tok 2 --out moe.pt

Argument parsing only; the work is `dit_moe.upcycle.upcycle_checkpoint` (see its docs for the method).
"""

from __future__ import annotations

import argparse
import sys

from dit_moe.models import DiT_models
from dit_moe.upcycle import DEFAULT_AUX_LOSS_COEF, ROUTER_INIT_STD, CheckpointError, UpcycleError, upcycle_checkpoint


def _flag(name: str) -> tuple[str, ...]:
    """Both spellings of a flag, `--num-experts` and `--num_experts` (one for a single word)."""
    return tuple(dict.fromkeys((f"--{name}", f"--{name.replace('-', '_')}")))


def _block_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected block indices such as 1,3,5, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(*_flag("ckpt"), required=True,
                        help="dense checkpoint: official DiT .pt, train.py dict, export or DeepSpeed dir")
    parser.add_argument(*_flag("out"), required=True, help="output export, .pt or .safetensors (by suffix)")
    parser.add_argument(*_flag("model"), choices=sorted(DiT_models), metavar="NAME",
                        help=f"must match the checkpoint when given; one of {', '.join(sorted(DiT_models))}")
    parser.add_argument(*_flag("num-experts"), type=int, default=8)
    parser.add_argument(*_flag("num-experts-per-tok"), type=int, default=2, help="top-k, at least 2")
    parser.add_argument(*_flag("image-size"), type=int,
                        help="pixels, checked against the file: input size = image size // 8 for 4-channel latents")
    parser.add_argument(*_flag("input-size"), type=int, help="model input side (latent size); checked against the file")
    parser.add_argument(*_flag("num-classes"), type=int, help="checked against the file")
    parser.add_argument(*_flag("num-heads"), type=int, help="only for a non-preset width the file does not describe")
    blocks = parser.add_mutually_exclusive_group()
    blocks.add_argument(*_flag("moe-layers"), type=_block_list, help="blocks to upcycle, e.g. 1,3,5 (default: all)")
    blocks.add_argument(*_flag("moe-every"), type=int, help="upcycle every N-th block: 2 gives blocks 1,3,5,...")
    parser.add_argument(*_flag("expert-noise"), type=float, default=0.0,
                        help="relative noise per expert copy: W + sigma * std(W) * N(0,1); 0: exact copies")
    parser.add_argument(*_flag("router-init-std"), type=float, default=ROUTER_INIT_STD)
    parser.add_argument(*_flag("aux-loss-coef"), type=float, default=DEFAULT_AUX_LOSS_COEF)
    parser.add_argument(*_flag("seed"), type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    src, out = args.pop("ckpt"), args.pop("out")
    try:
        dense, moe, path = upcycle_checkpoint(src, out, **args)
    except (CheckpointError, UpcycleError) as err:
        parser.exit(2, f"upcycle.py: error: {err}\n")
    blocks = "all" if moe.moe.moe_layers is None else ",".join(map(str, moe.moe.moe_layers))
    print(
        f"Upcycled {src} ({dense.depth} blocks, width {dense.hidden_size}) -> {path}: "
        f"{moe.num_experts} {moe.moe.expert_type} experts, top-{moe.moe.num_experts_per_tok}, MoE blocks {blocks}."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
