"""Routers compared at equal activated compute: the same data, steps, seeds and FFN FLOPs per token.

    python bench/routing_compare.py [--steps 800] [--batch-size 64] [--lr 2e-3] [--samples 500] [--seeds 0,1,2]
                                    [--out results/routing_compare]

Each variant trains DiT-T/2 (6 blocks, width C = 128) on the built-in digits (8x8, 16 tokens) with
rectified flow through the trainer (one CPU process unless a GPU is there), then samples
`--samples` conditional digits (Euler, cfg 1.5) and scores them with the digits classifier
(`python -m dit_moe.evaluation digits`), once per seed of `--seeds` (the seed sets the weights'
initialisation, the data order, the noise draws and the sampling seeds). The feed-forward of every
variant is meant to cost the same per token, 3 * C * 8C multiply-adds (a SwiGLU of activated width
8C; routers' C * E is extra); the table's compute columns are not taken from this list but counted
by `dit_moe.models.flops` from each trained export's config: in training (expert choice: its
capacity over the micro-batch) and at sampling (experts per token measured on `MEASURE_SAMPLES`
guided samples of the export, `ExpertsPerTokenMeter`):

    topk            8 experts of width 4C, top-2, aux loss 0.01 (DiT-MoE without its shared expert)
    expert-choice   8 experts of width 4C, each takes 2/8 of the micro-batch's tokens (cf 1)
    sigmoid-bias    8 experts of width 4C, top-2, sigmoid gating, aux-loss-free bias, no aux loss
    fine-grained    sigmoid-bias with 32 experts of width C (expert_width_ratio 0.25), top-7,
                    plus 1 shared expert of width C (DeepSeek-MoE's layout)
    dense           DiT's GELU MLP of width 12C (2 * C * 12C = 3 * C * 8C)

Reported per variant, as mean +- standard deviation over the seeds (so a difference smaller than
the spreads is noise): final loss (mean of the last 10% of logged steps), digits label accuracy
and digits-FD of the samples, expert-load balance over training (mean over logged steps of the
coefficient of variation of the per-expert loads, and of max/mean load, from metrics.jsonl),
and the median training step time. Writes OUT/table.md, OUT/results.json (every run) and
OUT/routing_compare.png (loss and load CV over training, first seed). The numbers hold for this
run's size only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dit_moe.models import flops  # noqa: E402

HIDDEN = 128  # DiT-T
MEASURE_SAMPLES = 32  # guided samples over which expert choice's experts per token are measured
FFN_PARTS = ("mlp", "router", "experts", "shared")
METRICS = ("final_loss", "label_accuracy", "digits_fd", "load_cv", "load_max_over_mean", "step_ms")
MOE = ["--num_experts", "8", "--num_experts_per_tok", "2", "--n-shared-experts", "0"]
VARIANTS = {
    "topk": [*MOE, "--router", "topk", "--aux-loss-coef", "0.01"],
    "expert-choice": [*MOE, "--router", "expert-choice"],
    "sigmoid-bias": [*MOE, "--router", "sigmoid-bias", "--aux-loss-coef", "0"],
    "fine-grained": [
        *("--num_experts", "32", "--num_experts_per_tok", "7", "--expert-width-ratio", "0.25"),
        *("--n-shared-experts", "0", "--num-shared-experts", "1", "--router", "sigmoid-bias", "--aux-loss-coef", "0"),
    ],
    "dense": ["--num_experts", "0", "--mlp-ratio", "12"],
}


def ffn_flops_per_token(config, experts_per_token=None) -> float:
    """Feed-forward FLOPs (router included) per token and block, mean over blocks, of a built config."""
    counts = flops.forward_flops(config, experts_per_token=experts_per_token)
    tokens = (config.input_size // config.patch_size) ** 2
    return sum(counts.get(part, 0) for part in FFN_PARTS) / (tokens * config.depth)


def measured_experts_per_token(export: Path, args: argparse.Namespace, seed: int) -> list[float]:
    """Expert copies per token of each MoE layer over `MEASURE_SAMPLES` guided samples of the export."""
    from dit_moe.models.moe import ExpertsPerTokenMeter
    from dit_moe.sampling import SamplingOptions
    from dit_moe.sampling.prepare import SamplingRequest, prepare_sampling

    options = SamplingOptions(sampler="euler", num_steps=args.sampling_steps, cfg_scale=1.5)
    prepared = prepare_sampling(SamplingRequest(export, vae_path="none", options=options, device="cpu"))
    labels = [i % prepared.config.num_classes for i in range(MEASURE_SAMPLES)]
    with ExpertsPerTokenMeter(prepared.model) as meter:
        prepared.sample(labels, [seed * 100_000 + i for i in range(MEASURE_SAMPLES)])
    return meter.per_layer()


def compute_columns(export: Path, args: argparse.Namespace, seed: int) -> dict:
    """FFN FLOPs per token in training and at sampling, counted from the export's config."""
    from dit_moe.checkpoint import load_model

    config = load_model(export).config
    if config.moe is None:
        return dict(train_ffn_flops=ffn_flops_per_token(config), sample_ffn_flops=ffn_flops_per_token(config))
    tokens = args.batch_size * (config.input_size // config.patch_size) ** 2  # one process: micro-batch = batch
    measured = measured_experts_per_token(export, args, seed)
    return dict(
        train_ffn_flops=ffn_flops_per_token(config, flops.routed_experts_per_token(config.moe, tokens)),
        sample_ffn_flops=ffn_flops_per_token(config, measured),
        sample_experts_per_token=measured,
    )


def run(cmd: list[str], log: Path) -> None:
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=os.environ.copy())
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed (exit {proc.returncode}); see {log}.")


def train_and_score(name: str, seed: int, args: argparse.Namespace, out: Path) -> dict:
    run_dir = out / f"{name}-seed{seed}"
    run_dir.mkdir(parents=True, exist_ok=True)
    python = sys.executable
    start = time.perf_counter()
    run(
        [python, "train_deepspeed.py", "--deepspeed_config", "config/zero2.json", "--model", "DiT-T/2",
         "--dataset", "digits", "--image-size", "8", "--objective", "flow", "--flow-t-scale", "1000",
         "--qk-norm", "false", "--lr", str(args.lr), "--ema-decay", "0.995", "--global-batch-size", str(args.batch_size),
         "--max-steps", str(args.steps), "--log-every", str(args.log_every), "--ckpt-every", str(args.steps),
         "--global-seed", str(seed), "--results-dir", str(run_dir / "run"), *VARIANTS[name]],
        run_dir / "train.log",
    )  # fmt: skip
    train_s = time.perf_counter() - start
    ckpt = run_dir / "run" / "export.safetensors"
    run(
        [python, "-m", "dit_moe.sampling.many", "--ckpt", str(ckpt), "--num-samples", str(args.samples),
         "--out", str(run_dir / "samples"), "--npz", str(run_dir / "samples.npz"), "--sampler", "euler",
         "--num-sampling-steps", str(args.sampling_steps), "--cfg-scale", "1.5", "--batch-size", "250",
         "--seed", str(seed * 100_000), "--vae-path", "none"],
        run_dir / "sample.log",
    )  # fmt: skip
    run(
        [python, "-m", "dit_moe.evaluation", "digits", "--samples", str(run_dir / "samples.npz"),
         "--json", str(run_dir / "digits_score.json"), "--cache-dir", str(out / ".digits_classifier")],
        run_dir / "score.log",
    )  # fmt: skip
    records = [json.loads(line) for line in (run_dir / "run" / "metrics.jsonl").read_text().splitlines() if line]
    score = json.loads((run_dir / "digits_score.json").read_text())
    tail = records[-max(1, len(records) // 10) :]
    moe = "expert_load_cv" in records[0]
    return dict(
        variant=name,
        seed=seed,
        **compute_columns(ckpt, args, seed),
        final_loss=statistics.fmean(r["loss"] for r in tail),
        label_accuracy=score["samples"]["label_accuracy"],
        digits_fd=score["samples"]["frechet_distance"],
        load_cv=statistics.fmean(r["expert_load_cv"] for r in records) if moe else None,
        load_max_over_mean=statistics.fmean(r["expert_load_max_over_mean"] for r in records) if moe else None,
        step_ms=1000 * statistics.median(1 / r["steps_per_s"] for r in records[1:] or records),
        train_s=train_s,
        curve=[(r["step"], r["loss"], r.get("expert_load_cv")) for r in records],
    )


def summary(results: list[dict], name: str) -> dict:
    """Mean and sample standard deviation over the seeds of every metric of variant `name`."""
    runs = [r for r in results if r["variant"] == name]
    compute = ("train_ffn_flops", "sample_ffn_flops")  # sampling: measured, so it may differ between seeds
    out = {"variant": name, "seeds": len(runs), **{k: statistics.fmean(r[k] for r in runs) for k in compute}}
    for key in METRICS:
        values = [r[key] for r in runs if r[key] is not None]
        out[key] = (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0) if values else None
    return out


def table(results: list[dict], args: argparse.Namespace) -> str:
    def num(value, fmt):
        return "-" if value is None else f"{value[0]:{fmt}} +- {value[1]:{fmt}}"

    seeds = sorted({r["seed"] for r in results})
    lines = [
        f"DiT-T/2 on digits 8x8, rectified flow, {args.steps} steps x batch {args.batch_size}, lr {args.lr:g}; "
        f"{args.samples} samples, Euler {args.sampling_steps} steps, cfg 1.5; mean +- std over seeds {seeds}.",
        "FFN kFLOPs/token: feed-forward FLOPs per token and block (router included), counted by dit_moe.models.flops "
        f"from each export's config, in training and at sampling (experts per token measured on {MEASURE_SAMPLES} "
        "guided samples).",
        "",
        "| variant | FFN kFLOPs/token train | sampling | final loss | label acc. | digits-FD | load CV | "
        "max/mean load | step (ms) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in dict.fromkeys(r["variant"] for r in results):
        r = summary(results, name)
        lines.append(
            f"| {name} | {r['train_ffn_flops'] / 1e3:.0f} | {r['sample_ffn_flops'] / 1e3:.0f} | "
            f"{num(r['final_loss'], '.4f')} | {num(r['label_accuracy'], '.3f')} | {num(r['digits_fd'], '.2f')} | "
            f"{num(r['load_cv'], '.3f')} | {num(r['load_max_over_mean'], '.2f')} | {num(r['step_ms'], '.0f')} |"
        )
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss_ax, cv_ax) = plt.subplots(1, 2, figsize=(10, 3.6))
    first = min(r["seed"] for r in results)
    for r in (r for r in results if r["seed"] == first):
        steps, losses, cvs = zip(*r["curve"])
        window = max(1, len(losses) // 20)
        smooth = [statistics.fmean(losses[max(0, i - window + 1) : i + 1]) for i in range(len(losses))]
        loss_ax.plot(steps, smooth, label=r["variant"])
        if r["load_cv"] is not None:
            cv_ax.plot(steps, cvs, label=r["variant"])
    loss_ax.set(xlabel="step", ylabel="training loss (moving mean)", title="loss")
    cv_ax.set(xlabel="step", ylabel="CV of expert loads", title="expert-load balance")
    loss_ax.legend()
    cv_ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--lr", type=float, default=2e-3, help="the quickstart's")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--samples", type=int, default=500)
    p.add_argument("--sampling-steps", type=int, default=25)
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds; each variant trains once per seed")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS))
    p.add_argument("--out", default="results/routing_compare")
    args = p.parse_args(argv)
    unknown = sorted(set(args.variants.split(",")) - set(VARIANTS))
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    seeds = [int(seed) for seed in args.seeds.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    start = time.perf_counter()
    for seed in seeds:  # seed-major: a stopped run has every variant at the first seeds
        for name in args.variants.split(","):
            results.append(train_and_score(name, seed, args, out))
            print(f"{name} seed {seed}: done in {results[-1]['train_s']:.0f} s of training", flush=True)
            text = table(results, args)  # rewritten after every run, so a stopped comparison keeps what it measured
            (out / "table.md").write_text(text + "\n")
            (out / "results.json").write_text(json.dumps(results, indent=2))
    plot(results, out / "routing_compare.png")
    text += f"\n\nWhole comparison (training, sampling and scoring every variant): {(time.perf_counter() - start) / 60:.1f} min."
    (out / "table.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
