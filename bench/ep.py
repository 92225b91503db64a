"""Step time and all-to-all traffic of the trainer with expert parallelism off (EP=1) and on (EP=2).

    python bench/ep.py [--model DiT-T/2] [--num-experts 4] [--image-size 16] [--global-batch-size 8]
                       [--steps 20] [--log-every 5] [--zero zero2]

Runs `train_deepspeed.py` twice on 2 CPU processes (deepspeed launcher, gloo, DS_ACCELERATOR=cpu)
on the built-in digits, same seed and global batch, and reads its metrics.jsonl:
  step time      mean seconds per optimizer step over the logged windows after the first (warm-up)
  a2a bytes      bytes each rank sends to the other through the expert all-to-alls per step
                 (forward and backward, dispatch and combine), mean over ranks
  a2a time       seconds per step inside the all-to-alls, mean over ranks
  tokens         token copies each rank sends to / receives from the other rank per step
  expert params  routed-expert parameters held per rank (from the export)
Ratios are against EP=1 measured in the same invocation. On 2 CPU cores the numbers show the
mechanics (traffic, overhead of the exchange), not GPU speed-ups.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from digits_trainer import ENV, REPO, digits_cmd
from safetensors import safe_open


def run(args: argparse.Namespace, ep_size: int, out: Path) -> dict:
    cmd = digits_cmd(
        2,
        f"config/{args.zero}.json",
        args.model,
        args.num_experts,
        args.image_size,
        "--global-batch-size",
        str(args.global_batch_size),
        "--max-steps",
        str(args.steps),
        "--log-every",
        str(args.log_every),
        "--ckpt-every",
        str(10**9),
        "--aux-loss-coef",
        "0",
        "--ep-size",
        str(ep_size),
        "--results-dir",
        str(out),
    )
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"EP={ep_size} run failed:\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = records[1:] or records
    result = {"step_s": statistics.mean(1.0 / r["steps_per_s"] for r in timed)}
    for key in ("ep_bytes_sent", "ep_all_to_all_s", "ep_tokens_sent", "ep_tokens_received"):
        per_rank = [statistics.mean(r[key][i] for r in timed) for i in range(2)] if key in timed[0] else [0.0, 0.0]
        result[key] = per_rank
    with safe_open(str(out / "export.safetensors"), framework="pt") as f:
        experts = sum(
            math.prod(f.get_slice(k).get_shape()) for k in f.keys() if k.startswith("model.") and ".moe.experts." in k
        )
    result["expert_params_per_rank"] = experts / ep_size
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="DiT-T/2")
    parser.add_argument("--num-experts", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--global-batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--log-every", type=int, default=5)
    parser.add_argument("--zero", default="zero2", choices=["zero1", "zero2"])
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        results = {ep: run(args, ep, Path(tmp) / f"ep{ep}") for ep in (1, 2)}
    base = results[1]
    print(
        f"{args.model}, {args.num_experts} experts top-2, image {args.image_size}, global batch "
        f"{args.global_batch_size}, {args.zero}, 2 CPU ranks (gloo); means over steps after the first window"
    )
    print(
        f"{'':6} {'step time':>16} {'a2a bytes/step':>15} {'a2a time/step':>14} {'tokens sent/recv per rank':>28} "
        f"{'expert params/rank':>24}"
    )
    for ep, r in results.items():
        sent, recv = r["ep_tokens_sent"], r["ep_tokens_received"]
        tokens = f"r0 {sent[0]:.0f}/{recv[0]:.0f}, r1 {sent[1]:.0f}/{recv[1]:.0f}"
        print(
            f"EP={ep:<3} {r['step_s'] * 1e3:8.1f} ms x{r['step_s'] / base['step_s']:4.2f} "
            f"{statistics.mean(r['ep_bytes_sent']) / 1e6:12.3f} MB {statistics.mean(r['ep_all_to_all_s']) * 1e3:11.1f} ms "
            f"{tokens:>28} {r['expert_params_per_rank'] / 1e6:12.3f} M x{r['expert_params_per_rank'] / base['expert_params_per_rank']:4.2f}"
        )


if __name__ == "__main__":
    main()
