"""Routing analysis: record which experts every token uses, and plot it (`analysis/*.py` land here too).

    python -m dit_moe.routing collect --ckpt FILE --out routing.npz [--vae-path DIR|none] [--classes 0,1,2]
        [--samples-per-class N] [--num-sampling-steps S] [--cfg-scale 1.5] [--sampler NAME] [--seed 0]
    python -m dit_moe.routing class   --routing routing.npz --out class.png [--layers 0,2]
    python -m dit_moe.routing patch   --routing routing.npz --out patch.png [--mode dominant|per-expert]
    python -m dit_moe.routing step    --routing routing.npz --out step.png [--bins 10]
    python -m dit_moe.routing summary --routing routing.npz [--json summary.json]
    python -m dit_moe.routing all     --ckpt FILE --out-dir DIR [collect options]

Bad input (missing or corrupt routing file, unknown layer, dense checkpoint) exits with
status 2 and one sentence.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from ..cli import flag, parse_int_list, parse_optional_int_list, run_main
from ..sampling.flags import add_sampling_flags, request_from_args
from .collect import RoutingRequest, analyse_routing, collect_routing, write_summary
from .plots import class_heatmap, patch_dominant_heatmap, patch_expert_heatmap, save_figure, step_heatmap
from .stats import load_counts
from .store import RoutingFile

DESCRIPTIONS = {
    "collect": "Sample from a checkpoint and record which experts every token is routed to.",
    "class": "Heatmap of expert selection by class, one panel per MoE layer.",
    "patch": "Heatmap of expert selection by patch position, one panel per MoE layer.",
    "step": "Heatmap of expert selection by denoising timestep, one panel per MoE layer.",
    "summary": "Per-layer expert load shares, their CV and entropy, and unused experts.",
    "all": "Record routing from a checkpoint and write every heatmap and the summary.",
}


def _add_collect_options(parser: argparse.ArgumentParser) -> None:
    add_sampling_flags(parser)
    parser.add_argument(
        *flag("classes"), type=parse_int_list, default=None, help="e.g. 0,1,2 (default: up to 10 evenly spaced)"
    )
    parser.add_argument(*flag("samples-per-class"), type=int, default=2, help="samples recorded per class")
    parser.add_argument(
        *flag("record-uncond"),
        action="store_true",
        help="also record CFG's unconditional half (tagged with the null label)",
    )
    parser.add_argument(*flag("batch-size"), type=int, default=32, help="images per forward")


def _add_routing_input(parser: argparse.ArgumentParser, out_help: str) -> None:
    parser.add_argument(*flag("routing"), required=True, help="routing file written by analysis/expert_data.py")
    parser.add_argument(*flag("out"), required=True, help=out_help)
    parser.add_argument(
        *flag("layers"),
        type=parse_optional_int_list,
        default=None,
        help='MoE layer (block) indices to plot; default (or "all") all',
    )


def _add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    """The flags of one command."""
    if command in ("collect", "all"):
        _add_collect_options(parser)
    if command == "collect":
        parser.add_argument(*flag("out"), required=True, help="routing .npz to write")
    elif command == "all":
        parser.add_argument(*flag("out-dir"), required=True, help="folder for routing.npz, heatmaps and summary")
    elif command == "summary":
        parser.add_argument(*flag("routing"), required=True, help="routing file written by analysis/expert_data.py")
        parser.add_argument(*flag("json"), default=None, help="also write the summary as JSON")
    else:
        _add_routing_input(parser, "PNG to write")
    if command == "patch":
        parser.add_argument(
            *flag("mode"),
            choices=["dominant", "per-expert"],
            default="dominant",
            help="dominant: most frequent expert per patch; per-expert: each expert's frequency map",
        )
    if command == "step":
        parser.add_argument(*flag("bins"), type=int, default=10, help="timestep bins (rows)")


def build_parser(command: Optional[str] = None) -> argparse.ArgumentParser:
    """The parser of one command (as the analysis scripts use it), or of all of them as subcommands."""
    if command is not None:
        parser = argparse.ArgumentParser(description=DESCRIPTIONS[command])
        _add_arguments(parser, command)
        parser.set_defaults(command=command)
        return parser
    parser = argparse.ArgumentParser(prog="python -m dit_moe.routing", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, description in DESCRIPTIONS.items():
        _add_arguments(sub.add_parser(name, description=description, help=description), name)
    return parser


def routing_request(args: argparse.Namespace) -> RoutingRequest:
    """The RoutingRequest a parsed `collect` or `all` command line describes."""
    return RoutingRequest(
        request_from_args(args),
        classes=args.classes,
        samples_per_class=args.samples_per_class,
        seed=args.seed,
        batch_size=args.batch_size,
        record_uncond=args.record_uncond,
    )


def _sampling_cost(routing: Path) -> str:
    """What sampling the routing file's images cost, as its metadata records it."""
    with RoutingFile(routing) as recorded:
        return recorded.meta.get("cost", "cost not recorded")


def run(args: argparse.Namespace) -> None:
    """Carry out one parsed command, printing what it wrote."""
    if args.command == "collect":
        path = collect_routing(routing_request(args), args.out)
        print(f"Saved routing of every token to {path} ({_sampling_cost(path)})")
    elif args.command == "all":
        paths = analyse_routing(routing_request(args), args.out_dir)
        print(f"Sampled with {_sampling_cost(paths['routing'])}")
        print(Path(paths["summary_txt"]).read_text(), end="")
        print("Wrote " + ", ".join(str(p) for p in paths.values()))
    elif args.command == "summary":
        _, text = write_summary(args.routing, args.json)
        print(text)
        if args.json:
            print(f"Wrote {args.json}")
    else:
        counts = load_counts(args.routing)
        if args.command == "class":
            fig = class_heatmap(counts, args.layers)
        elif args.command == "step":
            fig = step_heatmap(counts, bins=args.bins, layers=args.layers)
        elif args.mode == "dominant":
            fig = patch_dominant_heatmap(counts, args.layers)
        else:
            fig = patch_expert_heatmap(counts, args.layers)
        print(f"Wrote {save_figure(fig, args.out)}")


def main(argv: Optional[Sequence[str]] = None, command: Optional[str] = None) -> int:
    """Entry point: `command` fixes the subcommand (the analysis scripts), else argv[0] names it."""
    parser = build_parser(command)
    args = parser.parse_args(argv)
    return run_main(lambda: run(args), prog=parser.prog)


if __name__ == "__main__":
    sys.exit(main())
