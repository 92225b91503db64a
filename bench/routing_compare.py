"""Routers compared at equal activated compute: the same data, steps, seed and FFN FLOPs per token.

    python bench/routing_compare.py [--steps 800] [--batch-size 64] [--lr 2e-3] [--samples 500] [--out results/routing_compare]

Each variant trains DiT-T/2 (6 blocks, width C = 128) on the built-in digits (8x8, 16 tokens) with
rectified flow through the trainer (one CPU process unless a GPU is there), then samples
`--samples` conditional digits (Euler, cfg 1.5) and scores them with the digits classifier
(`python -m dit_moe.evaluation digits`). The feed-forward of every variant costs the same per
token, 3 * C * 8C multiply-adds (a SwiGLU of activated width 8C; routers' C * E is extra):

    topk            8 experts of width 4C, top-2, aux loss 0.01 (DiT-MoE without its shared expert)
    expert-choice   8 experts of width 4C, each takes 2/8 of the micro-batch's tokens (cf 1)
    sigmoid-bias    8 experts of width 4C, top-2, sigmoid gating, aux-loss-free bias, no aux loss
    fine-grained    sigmoid-bias with 32 experts of width C (expert_width_ratio 0.25), top-7,
                    plus 1 shared expert of width C (DeepSeek-MoE's layout)
    dense           DiT's GELU MLP of width 12C (2 * C * 12C = 3 * C * 8C)

Reported per variant: final loss (mean of the last 10% of logged steps), digits label accuracy
and digits-FD of the samples, expert-load balance over training (mean over logged steps of the
coefficient of variation of the per-expert loads, and of max/mean load, from metrics.jsonl),
and the median training step time. Writes OUT/table.md, OUT/results.json and OUT/routing_compare.png
(loss and load CV over training). The numbers hold for this run's size only.
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
HIDDEN = 128  # DiT-T
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
# (routed experts, width, active) and shared width of each variant, for the FLOPs column.
SHAPES = {
    "topk": (8, 4 * HIDDEN, 2, 0),
    "expert-choice": (8, 4 * HIDDEN, 2, 0),
    "sigmoid-bias": (8, 4 * HIDDEN, 2, 0),
    "fine-grained": (32, HIDDEN, 7, HIDDEN),
}


def ffn_macs(name: str) -> int:
    """Multiply-adds per token of one block's feed-forward (router included)."""
    if name == "dense":
        return 2 * HIDDEN * 12 * HIDDEN
    experts, width, active, shared = SHAPES[name]
    return 3 * HIDDEN * (active * width + shared) + HIDDEN * experts


def run(cmd: list[str], log: Path) -> None:
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=os.environ.copy())
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed (exit {proc.returncode}); see {log}.")


def train_and_score(name: str, args: argparse.Namespace, out: Path) -> dict:
    run_dir = out / name
    run_dir.mkdir(parents=True, exist_ok=True)
    python = sys.executable
    start = time.perf_counter()
    run(
        [python, "train_deepspeed.py", "--deepspeed_config", "config/zero2.json", "--model", "DiT-T/2",
         "--dataset", "digits", "--image-size", "8", "--objective", "flow", "--flow-t-scale", "1000",
         "--qk-norm", "false", "--lr", str(args.lr), "--ema-decay", "0.995", "--global-batch-size", str(args.batch_size),
         "--max-steps", str(args.steps), "--log-every", str(args.log_every), "--ckpt-every", str(args.steps),
         "--global-seed", str(args.seed), "--results-dir", str(run_dir / "run"), *VARIANTS[name]],
        run_dir / "train.log",
    )  # fmt: skip
    train_s = time.perf_counter() - start
    ckpt = run_dir / "run" / "export.safetensors"
    run(
        [python, "-m", "dit_moe.sampling.many", "--ckpt", str(ckpt), "--num-samples", str(args.samples),
         "--out", str(run_dir / "samples"), "--npz", str(run_dir / "samples.npz"), "--sampler", "euler",
         "--num-sampling-steps", str(args.sampling_steps), "--cfg-scale", "1.5", "--batch-size", "250",
         "--seed", str(args.seed), "--vae-path", "none"],
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
        ffn_macs_per_token=ffn_macs(name),
        final_loss=statistics.fmean(r["loss"] for r in tail),
        label_accuracy=score["samples"]["label_accuracy"],
        digits_fd=score["samples"]["frechet_distance"],
        load_cv=statistics.fmean(r["expert_load_cv"] for r in records) if moe else None,
        load_max_over_mean=statistics.fmean(r["expert_load_max_over_mean"] for r in records) if moe else None,
        step_ms=1000 * statistics.median(1 / r["steps_per_s"] for r in records[1:] or records),
        train_s=train_s,
        curve=[(r["step"], r["loss"], r.get("expert_load_cv")) for r in records],
    )


def table(results: list[dict], args: argparse.Namespace) -> str:
    def num(value, fmt):
        return "-" if value is None else format(value, fmt)

    lines = [
        f"DiT-T/2 on digits 8x8, rectified flow, {args.steps} steps x batch {args.batch_size}, lr {args.lr:g}, "
        f"seed {args.seed}; "
        f"{args.samples} samples, Euler {args.sampling_steps} steps, cfg 1.5.",
        "",
        "| variant | FFN MACs/token | final loss | label acc. | digits-FD | load CV | max/mean load | step (ms) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['variant']} | {r['ffn_macs_per_token'] / 1e3:.0f}k | {r['final_loss']:.4f} | "
            f"{r['label_accuracy']:.3f} | {r['digits_fd']:.2f} | {num(r['load_cv'], '.3f')} | "
            f"{num(r['load_max_over_mean'], '.2f')} | {r['step_ms']:.0f} |"
        )
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss_ax, cv_ax) = plt.subplots(1, 2, figsize=(10, 3.6))
    for r in results:
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
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS))
    p.add_argument("--out", default="results/routing_compare")
    args = p.parse_args(argv)
    unknown = sorted(set(args.variants.split(",")) - set(VARIANTS))
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    start = time.perf_counter()
    for name in args.variants.split(","):
        results.append(train_and_score(name, args, out))
        print(f"{name}: done in {results[-1]['train_s']:.0f} s of training", flush=True)
        text = table(results, args)  # rewritten after every variant, so a stopped run keeps what it measured
        (out / "table.md").write_text(text + "\n")
        (out / "results.json").write_text(json.dumps(results, indent=2))
    plot(results, out / "routing_compare.png")
    text += f"\n\nWhole comparison (training, sampling and scoring every variant): {(time.perf_counter() - start) / 60:.1f} min."
    (out / "table.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
