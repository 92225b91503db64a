"""The command line of sparse upcycling (dit_moe.upcycle): `python upcycle.py` and `python -m dit_moe.upcycle`.

python upcycle.py --model DiT-S/2 --ckpt dense.pt --num_experts 8 --num_experts_per_tok 2 --out moe.pt
"""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

from ..cli import add_weights_flag, flag, parse_int_list, run_main
from ..models import DiT_models
from .request import UpcycleRequest, upcycle_checkpoint
from .transform import DEFAULT_AUX_LOSS_COEF, ROUTER_INIT_STD, UPCYCLE_ROUTERS, ExpertInit, upcycle_moe_args


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Upcycle a dense DiT checkpoint into a DiT-MoE checkpoint that starts where the dense model was.",
    )
    parser.add_argument(
        *flag("ckpt"), required=True, help="dense checkpoint: official DiT .pt, train.py dict, export or DeepSpeed dir"
    )
    parser.add_argument(*flag("out"), required=True, help="output export, .pt or .safetensors (by suffix)")
    parser.add_argument(
        *flag("model"),
        choices=sorted(DiT_models),
        metavar="NAME",
        help=f"must match the checkpoint when given; one of {', '.join(sorted(DiT_models))}",
    )
    parser.add_argument(*flag("num-experts"), type=int, default=8, help="routed experts per MoE block (default 8)")
    parser.add_argument(*flag("num-experts-per-tok"), type=int, default=2, help="top-k, at least 2")
    parser.add_argument(
        *flag("image-size"),
        type=int,
        help="pixels, checked against the file: input size = image size // 8 for 4-channel latents",
    )
    parser.add_argument(*flag("input-size"), type=int, help="model input side (latent size); checked against the file")
    parser.add_argument(*flag("num-classes"), type=int, help="checked against the file")
    parser.add_argument(*flag("num-heads"), type=int, help="only for a non-preset width the file does not describe")
    blocks = parser.add_mutually_exclusive_group()
    blocks.add_argument(*flag("moe-layers"), type=parse_int_list, help="blocks to upcycle, e.g. 1,3,5 (default: all)")
    blocks.add_argument(*flag("moe-every"), type=int, help="upcycle every N-th block: 2 gives blocks 1,3,5,...")
    parser.add_argument(
        *flag("expert-noise"),
        type=float,
        default=0.0,
        help="relative noise per expert copy: W + sigma * std(W) * N(0,1); 0: exact copies",
    )
    parser.add_argument(
        *flag("router-init-std"),
        type=float,
        default=ROUTER_INIT_STD,
        help="std of the new router weights (default 1e-3)",
    )
    parser.add_argument(
        *flag("aux-loss-coef"), type=float, default=DEFAULT_AUX_LOSS_COEF, help="load-balancing loss coefficient"
    )
    parser.add_argument(*flag("router"), choices=UPCYCLE_ROUTERS, default="topk", help="the MoE model's router")
    parser.add_argument(*flag("seed"), type=int, default=0, help="seeds the router and expert-noise draws")
    add_weights_flag(parser)
    return parser


def request_from_args(args: argparse.Namespace) -> UpcycleRequest:
    """The UpcycleRequest a parsed command line describes."""
    moe = upcycle_moe_args(
        args.num_experts,
        args.num_experts_per_tok,
        router=args.router,
        aux_loss_coef=args.aux_loss_coef,
        moe_layers=args.moe_layers,
    )
    init = ExpertInit(expert_noise=args.expert_noise, router_init_std=args.router_init_std, seed=args.seed)
    checks = {key: getattr(args, key) for key in ("model", "image_size", "input_size", "num_classes", "num_heads")}
    return UpcycleRequest(
        args.ckpt, args.out, moe=moe, init=init, moe_every=args.moe_every, weights=args.weights, **checks
    )


def main(argv: Optional[Sequence[str]] = None, prog: str = "upcycle.py") -> int:
    """Parse, upcycle, print what was written; bad input exits 2 with one sentence on stderr."""
    args = build_parser(prog).parse_args(argv)

    def work() -> None:
        dense, moe, path = upcycle_checkpoint(request_from_args(args))
        blocks = "all" if moe.moe.moe_layers is None else ",".join(map(str, moe.moe.moe_layers))
        print(
            f"Upcycled {args.ckpt} ({dense.depth} blocks, width {dense.hidden_size}) -> {path}: "
            f"{moe.num_experts} {moe.moe.expert_type} experts, top-{moe.moe.num_experts_per_tok}, MoE blocks {blocks}."
        )

    return run_main(work, prog=prog)
