"""`python -m dit_moe.diffusers export --ckpt FILE --out DIR`: a checkpoint as a diffusers pipeline folder."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from ..cli import flag, run_main
from .export import DEFAULT_MAX_SHARD_SIZE, ExportRequest, export_pipeline

PROG = "python -m dit_moe.diffusers"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Export a DiT / DiT-MoE checkpoint as a diffusers pipeline."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="write a folder DiffusionPipeline.from_pretrained loads")
    export.add_argument(*flag("ckpt"), required=True, help="any checkpoint load_model reads, or a release name")
    export.add_argument(*flag("out"), required=True, help="pipeline folder to write (replaced if it holds one)")
    export.add_argument(*flag("vae-path"), default=None, help="latent models: AutoencoderKL folder, or mse/ema/hub id")
    export.add_argument(*flag("objective"), choices=("iddpm", "flow"), default=None, help="for files that record none")
    export.add_argument(
        *flag("class-names"), default=None, help="JSON {id: name} or list, or none (default: digits' / ImageNet's)"
    )
    export.add_argument(
        *flag("guidance-channels"), type=int, default=None, help="guided channels (default all; 3: DiT's)"
    )
    export.add_argument(*flag("num-experts-per-tok"), type=int, default=None, help="top-k override")
    export.add_argument(
        *flag("max-shard-size"),
        default=DEFAULT_MAX_SHARD_SIZE,
        help=f"weights shard size (default {DEFAULT_MAX_SHARD_SIZE})",
    )
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)

    def work() -> None:
        request = ExportRequest(
            args.ckpt,
            args.out,
            vae_path=args.vae_path,
            objective=args.objective,
            class_names=args.class_names,
            guidance_channels=args.guidance_channels,
            num_experts_per_tok=args.num_experts_per_tok,
            max_shard_size=args.max_shard_size,
        )
        out = export_pipeline(request)
        print(
            f"Wrote the diffusers pipeline to {out}; load it with DiffusionPipeline.from_pretrained({str(out)!r}, trust_remote_code=True)"
        )

    return run_main(work, prog=PROG)


if __name__ == "__main__":
    sys.exit(main())
