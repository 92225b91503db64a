"""Quality against model evaluations for every sampler, with and without guidance interval and step caching.

    python bench/sampling_quality.py --ckpt results/sampling_quality/flow/export.safetensors \
        --json results/sampling_quality/flow.json --num-samples 1000
    python bench/sampling_quality.py --ckpt results/sampling_quality/iddpm/export.safetensors \
        --json results/sampling_quality/iddpm.json --num-samples 1000
    python bench/sampling_quality.py --report results/sampling_quality/flow.json results/sampling_quality/iddpm.json \
        --plot docs/sampling_quality.png                   # the markdown table and the plot of docs/sampling.md

For a model trained on the built-in digits (config/quickstart.yaml; `--objective iddpm --max-steps 4000`
for the IDDPM one, which at 1,000 steps is too weak for its ODE to match DDPM: docs/sampling.md), each setting samples --num-samples images (labels 0..9 cycled, sample i with seed i: the same
noise for every setting) and scores them with dit_moe.evaluation's digits judge: label accuracy and
digits-FD (FID's formula on the judge's features; it grows as n shrinks, so compare at one n). The
first setting is the reference default (flow: Euler 50 steps, DiT-MoE's; IDDPM: DDPM 250 steps,
DiT's), all guided at --cfg-scale. Per setting the JSON holds model evaluations per image (a guided
step forwards two rows inside the guidance interval), FLOPs per image (dit_moe.models.flops, after
what --cache saved), label accuracy, digits-FD, and images/s against the reference's, timed in the
same run on the same machine. Settings already in --json are kept (a killed run resumes).

Setting syntax (--settings, comma-free words): SAMPLER:STEPS[:interval=LO,HI][:cache=experts:N].
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from dit_moe.evaluation import DigitsScorer
from dit_moe.sampling import SamplingOptions, SamplingRequest, prepare_sampling
from dit_moe.utils.atomic import write_text

REFERENCE = {"flow": "euler:50", "iddpm": "ddpm:250"}
SOLVERS = ("dpm++2m", "dpm++3m", "dpm++2m-sde", "unipc", "deis")
INTERVAL = "interval=0.28,5.42"  # Kynkaanniemi et al. 2024's EDM2/SD-XL interval, in sigma of x_t/alpha_t


def default_settings(objective: str) -> list[str]:
    """The reference default, every solver at a few step counts, then interval and caching on the main ones."""
    steps = (5, 10, 20) if objective == "flow" else (10, 25, 50)
    ours = ["euler:10", "euler:25", "heun:5", "heun:10"] if objective == "flow" else ["ddim:25", "ddim:50"]
    main = f"unipc:{steps[1]}"
    extras = [
        f"{main}:{INTERVAL}",
        f"{main}:cache=experts:2",
        f"{main}:{INTERVAL}:cache=experts:2",
        f"{REFERENCE[objective]}:{INTERVAL}",
        f"{REFERENCE[objective]}:cache=experts:2",
    ]
    return [REFERENCE[objective], *ours, *(f"{s}:{n}" for s in SOLVERS for n in steps), *extras]


def parse_setting(text: str) -> SamplingOptions:
    """SAMPLER:STEPS[:interval=LO,HI][:cache=KIND:N] -> SamplingOptions (cfg filled in later)."""
    sampler, steps, *rest = text.split(":")
    options = dict(sampler=sampler, num_steps=int(steps))
    for word in rest:
        if word.startswith("interval="):
            low, high = word.removeprefix("interval=").split(",")
            options["guidance_interval"] = (float(low), float(high))
        elif word.startswith("cache="):
            options["cache"] = word.removeprefix("cache=")
        elif options.get("cache", "").endswith(("experts",)):
            options["cache"] += ":" + word
        else:
            raise SystemExit(f"Cannot read setting {text!r}: {word!r} is neither interval=LO,HI nor cache=KIND:N.")
    return SamplingOptions(**options)


def run_setting(args: argparse.Namespace, setting: str, scorer: DigitsScorer) -> dict:
    """Sample --num-samples images with `setting`, time them and score them."""
    options = parse_setting(setting)
    options.cfg_scale = args.cfg_scale
    prepared = prepare_sampling(SamplingRequest(args.ckpt, options=options, device="cpu"))
    labels = [i % prepared.config.num_classes for i in range(args.num_samples)]
    images, start = [], time.perf_counter()
    for first in range(0, args.num_samples, args.batch_size):
        batch = list(range(first, min(first + args.batch_size, args.num_samples)))
        images.append(prepared.sample([labels[i] for i in batch], batch))
    seconds = time.perf_counter() - start
    stats, score = prepared.stats, scorer.score(torch.cat(images), np.asarray(labels))
    return dict(
        setting=setting,
        objective=prepared.objective_name,
        evaluations_per_image=stats.evaluations_per_image,
        gflops_per_image=stats.flops / stats.images / 1e9,
        flops_saved=stats.flops_saved / max(1, stats.flops + stats.flops_saved),
        label_accuracy=score["label_accuracy"],
        digits_fd=score["frechet_distance"],
        images_per_s=args.num_samples / seconds,
    )


def bench(args: argparse.Namespace) -> None:
    path = Path(args.json)
    results = json.loads(path.read_text()) if path.is_file() else {"num_samples": args.num_samples, "rows": []}
    done = {row["setting"] for row in results["rows"]}
    scorer = DigitsScorer.fit(cache_dir=path.parent)
    objective = prepare_sampling(SamplingRequest(args.ckpt, device="cpu")).objective_name
    for setting in args.settings or default_settings(objective):
        if setting in done:
            continue
        row = run_setting(args, setting, scorer)
        row["reference"] = setting == REFERENCE[objective]
        results["rows"].append(row)
        reference = next((r for r in results["rows"] if r["reference"]), row)
        row["speed_vs_reference"] = row["images_per_s"] / reference["images_per_s"]
        print(_line(row, results["num_samples"]), flush=True)
        write_text(path, json.dumps(results, indent=1))


def _line(row: dict, num_samples: int) -> str:
    return (
        f"| {row['objective']} | {num_samples} | {row['setting']}{' (reference)' if row['reference'] else ''} | "
        f"{row['evaluations_per_image']:.1f} | {row['gflops_per_image']:.3f} | {row['flops_saved']:.0%} | "
        f"{row['label_accuracy']:.3f} | {row['digits_fd']:.2f} | {row['speed_vs_reference']:.2f}x |"
    )


def report(paths: list[str], plot: str | None) -> None:
    """The markdown table of every run, and the plot (evaluations on x, digits-FD on y)."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    print(
        "| model | samples | setting | evaluations / image | GFLOPs / image | FLOPs saved | label acc. | digits-FD | images/s vs reference |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for run in runs:
        for row in run["rows"]:
            print(_line(row, run["num_samples"]))
    if plot:
        _plot(runs, plot)


def _plot(runs: list[dict], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, len(runs), figsize=(6 * len(runs), 4.5), squeeze=False)
    for ax, run in zip(axes[0], runs):
        rows = run["rows"]
        plain = [r for r in rows if "=" not in r["setting"]]
        for sampler in dict.fromkeys(r["setting"].split(":")[0] for r in plain):
            line = sorted(
                (r for r in plain if r["setting"].split(":")[0] == sampler), key=lambda r: r["evaluations_per_image"]
            )
            ax.plot([r["evaluations_per_image"] for r in line], [r["digits_fd"] for r in line], "o-", label=sampler)
        for r in rows:
            if "=" in r["setting"]:
                marker = {(True, False): "s", (False, True): "^"}.get(
                    ("interval" in r["setting"], "cache" in r["setting"]), "D"
                )
                ax.plot(r["evaluations_per_image"], r["digits_fd"], marker, mfc="none", color="k")
                ax.annotate(
                    r["setting"].split(":", 2)[-1].replace("experts:", ""),
                    (r["evaluations_per_image"], r["digits_fd"]),
                    xytext=(5, 2),
                    textcoords="offset points",
                    fontsize=6,
                )
            if r["reference"]:
                ax.plot(
                    r["evaluations_per_image"],
                    r["digits_fd"],
                    "*",
                    ms=16,
                    color="gold",
                    mec="k",
                    label=f"reference default ({r['setting']})",
                )
        ax.set_xscale("log")
        ax.set_xticks(sorted({r["evaluations_per_image"] for r in plain}))
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("model evaluations per image (guided: 2 per step inside the interval)")
        ax.set_ylabel(f"digits-FD ({run['num_samples']} samples)")
        ax.set_title(f"{rows[0]['objective']} digits model")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"Wrote {out}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", help="a digits model (export or checkpoint folder)")
    parser.add_argument("--json", help="results file (resumed if present)")
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--cfg-scale", type=float, default=1.5)
    parser.add_argument("--settings", nargs="*", default=None, help="default: default_settings(objective)")
    parser.add_argument("--report", nargs="*", default=None, help="JSON files to tabulate (and --plot)")
    parser.add_argument("--plot", default=None)
    args = parser.parse_args(argv)
    if args.report:
        report(args.report, args.plot)
    else:
        bench(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
