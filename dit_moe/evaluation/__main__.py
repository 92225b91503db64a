"""Command line for the evaluation tools.

    python -m dit_moe.evaluation fid --samples samples.npz --ref VIRTUAL_imagenet256_labeled.npz \
        --inception-weights inception-2015-12-05.pt [--device cuda] [--json results.json]
    python -m dit_moe.evaluation stats --images ref_images.npz --out ref_stats.npz --inception-weights PATH
    python -m dit_moe.evaluation digits --samples samples.npz [--seed 0] [--cache-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from ..cli import default_device, flag, run_main
from ..utils.atomic import write_text
from ..utils.errors import UserError
from .digits_score import DigitsScorer
from .fid import evaluate, save_reference_statistics
from .npz import read_npz

PROG = "python -m dit_moe.evaluation"


def _add_inception_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        *flag("inception-weights"),
        default=None,
        help="inception-2015-12-05.pt (NVIDIA's TorchScript FID network) or the folder holding it",
    )
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument(*flag("batch-size"), type=int, default=64, help="images per Inception forward")


def _write_json(path: Optional[str], results: dict) -> None:
    if path:
        write_text(path, json.dumps(results, indent=2))


def _fid(args: argparse.Namespace) -> dict:
    results = evaluate(
        args.samples, args.ref, args.inception_weights, args.device or default_device(), args.batch_size, progress=True
    )
    for name, value in results.items():
        print(f"{name}: {value:.4f}" if name != "num_samples" else f"{name}: {int(value)}")
    _write_json(args.json, results)
    return results


def _stats(args: argparse.Namespace) -> dict:
    path = save_reference_statistics(
        args.images, args.out, args.inception_weights, args.device or default_device(), args.batch_size, progress=True
    )
    print(f"Saved reference statistics to {path}")
    return {"out": str(path)}


def _digits(args: argparse.Namespace) -> dict:
    batch = read_npz(args.samples)
    if batch.images is None or batch.labels is None:
        raise UserError(
            f"{args.samples} needs images (arr_0) and their conditioning labels (arr_1) for the digits score."
        )
    scorer = DigitsScorer.fit(seed=args.seed, cache_dir=args.cache_dir)
    results = {
        "samples": scorer.score(batch.images, batch.labels),
        "real_ceiling": scorer.real_ceiling(),
        "classifier_heldout_accuracy": scorer.heldout_accuracy,
    }
    print(f"digits classifier held-out accuracy: {scorer.heldout_accuracy:.3f}")
    for name in ("samples", "real_ceiling"):
        r = results[name]
        print(f"{name}: label accuracy {r['label_accuracy']:.3f}, digits-FD {r['frechet_distance']:.3f} (n={r['n']})")
    _write_json(args.json, results)
    return results


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    fid = commands.add_parser("fid", help="FID, Inception Score and precision/recall of samples against a reference")
    fid.add_argument("--samples", required=True, help="sample batch .npz (arr_0 uint8 NHWC)")
    fid.add_argument("--ref", required=True, help="reference .npz: images (arr_0) and/or statistics (mu, sigma)")
    _add_inception_flags(fid)
    fid.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    fid.set_defaults(run=_fid)

    stats = commands.add_parser("stats", help="precompute reference statistics (mu, sigma) of an image .npz")
    stats.add_argument("--images", required=True, help="image batch .npz (arr_0 uint8 NHWC)")
    stats.add_argument("--out", required=True, help="statistics .npz to write (mu, sigma)")
    _add_inception_flags(stats)
    stats.set_defaults(run=_stats)

    digits = commands.add_parser("digits", help="label accuracy and digits-FD of conditional digits samples")
    digits.add_argument("--samples", required=True, help="sample batch .npz with labels (arr_1)")
    digits.add_argument("--seed", type=int, default=0, help="classifier training seed")
    digits.add_argument(*flag("cache-dir"), default=None, help="keep the fitted classifier here")
    digits.add_argument("--json", default=None, help="also write the scores to this JSON file")
    digits.set_defaults(run=_digits)
    return parser


def run(argv: Optional[Sequence[str]] = None) -> dict:
    """Parse one command line and carry it out; returns the numbers it printed."""
    args = build_parser().parse_args(argv)
    return args.run(args)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point: bad input (missing file, weights or labels) exits 2 with one sentence on stderr."""

    def work() -> None:
        run(argv)

    return run_main(work, prog=PROG)


if __name__ == "__main__":
    sys.exit(main())
