"""What a resharding resume costs against a same-shape resume: time and disk.

    python bench/resume.py [--model DiT-S/2] [--num-experts 8] [--image-size 8] [--zero zero2]

On the built-in digits (DS_ACCELERATOR=cpu, gloo), one optimizer step then a checkpoint; runs on 2
processes use --ep-size 2 (half the experts per process: DiT-S/2 8E2A is 199M parameters, 3.2 GB of
fp32 weights, gradients and Adam state per process without it):
  A  2 processes, resumable state on (the default)     -> the same-shape tag
  B  1 process,   resumable state on                    -> the tag to reshard (another world and ep size)
  C  2 processes, --elastic-checkpoints false           -> DeepSpeed's own optimizer files instead
then `--export-only` resumes on 2 processes, which load the tag and write the export:
  same shape   A's tag (each rank reads back its own ranges)
  reshard      B's tag (`dit_moe.train.reshard`: each rank reads the ranges it owns in this shape)
Times are what the trainer logs to log.txt: "Saved the checkpoint of step 1 in X s" (A vs C) and
"Resumed from ... in X s" (load + reshard, EMA, RNG and data position; start-up and export excluded).
Disk: the tag's size and its resumable state (the state_rank*.safetensors files). ZeRO's communication buckets are cut to
--bucket-elements (the JSON's 5e8 fp32 elements are 2 GB per bucket, more than a shared CPU host
spares). On 2 shared CPU cores the numbers show the mechanics, not a GPU cluster's speed.

Per-rank memory and bytes, at several widths and world sizes: bench/checkpoint_scale.py.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import tempfile
from pathlib import Path

from digits_trainer import ENV, REPO, digits_cmd


def trainer(args: argparse.Namespace, ranks: int, out: Path, *extra: str) -> None:
    """One trainer run: one step at global batch 4 and a checkpoint, with `extra` flags."""
    ep_size = str(args.ep_size if ranks > 1 else 1)
    flags = ["--global-batch-size", "4", "--max-steps", "1", "--log-every", "1", "--ep-size", ep_size, *extra]
    flags += ["--results-dir", str(out)]
    cmd = digits_cmd(ranks, str(args.config), args.model, args.num_experts, args.image_size, *flags)
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"trainer failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")


def logged_seconds(out: Path, what: str) -> float:
    """The seconds of the last "<what> ... in X s." line of the run's log."""
    lines = [line for line in (out / "log.txt").read_text().splitlines() if what in line]
    return float(re.search(r" in ([0-9.]+) s\.", lines[-1]).group(1))


def small_buckets(config: Path, elements: float, out_dir: Path) -> Path:
    """A copy of the DeepSpeed config with its reduce / all-gather buckets cut to `elements`."""
    ds_config = json.loads(config.read_text())
    for key in ("reduce_bucket_size", "allgather_bucket_size", "stage3_prefetch_bucket_size"):
        if key in ds_config.get("zero_optimization", {}):
            ds_config["zero_optimization"][key] = elements
    path = out_dir / config.name
    path.write_text(json.dumps(ds_config))
    return path


def tag_sizes(results: Path) -> tuple[int, int]:
    """(bytes of the step-1 tag, bytes of its resumable state)."""
    tag = results / "checkpoints" / "step0000001"
    total = sum(p.stat().st_size for p in tag.rglob("*") if p.is_file())
    return total, sum(p.stat().st_size for p in tag.glob("state_rank*.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="DiT-S/2")
    parser.add_argument("--num-experts", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=8)
    parser.add_argument("--zero", default="zero2")
    parser.add_argument("--bucket-elements", type=float, default=2e7)
    parser.add_argument("--ep-size", type=int, default=2, help="of the runs on 2 processes")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        args.config = small_buckets(REPO / "config" / f"{args.zero}.json", args.bucket_elements, Path(tmp))
        a, b, c = (Path(tmp) / name for name in "abc")
        trainer(args, 2, a)
        trainer(args, 1, b)
        trainer(args, 2, c, "--elastic-checkpoints", "false")
        for tag_of in (a, b):
            trainer(args, 2, tag_of, "--resume", "auto", "--export-only", "true")
        save_full, save_bare = logged_seconds(a, "Saved the checkpoint"), logged_seconds(c, "Saved the checkpoint")
        same, reshard = logged_seconds(a, "Resumed from"), logged_seconds(b, "Resumed from")
        (size_a, full_a), (size_c, _) = tag_sizes(a), tag_sizes(c)
    mib = 1 / 2**20
    print(f"{args.model} {args.num_experts}E2A, {args.zero}, 2 CPU processes with --ep-size {args.ep_size}")
    print(f"  save:   {save_full:6.2f} s with the resumable state, {save_bare:6.2f} s without")
    print(f"  resume: {same:6.2f} s same shape, {reshard:6.2f} s resharded from 1 process, ep 1")
    print(
        f"  tag:    {size_a * mib:7.1f} MiB with the resumable state ({full_a * mib:.1f} MiB of it), "
        f"{size_c * mib:.1f} MiB without"
    )


if __name__ == "__main__":
    main()
