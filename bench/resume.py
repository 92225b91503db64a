"""What a resharding resume costs against a same-shape resume: time and disk.

    python bench/resume.py [--model DiT-S/2] [--num-experts 8] [--image-size 8] [--zero zero2]

On the built-in digits (DS_ACCELERATOR=cpu, gloo), one optimizer step then a checkpoint:
  A  2 processes, full state on (the default)          -> the same-shape tag
  B  1 process,   full state on                         -> the tag to reshard
  C  2 processes, --elastic-checkpoints false           -> the save-time overhead of the full state (A - C)
then `--export-only` resumes on 2 processes, which load the tag and write the export:
  same shape   A's tag (DeepSpeed's own loader)
  reshard      B's tag (`dit_moe.train.reshard`: full state -> this world size's ZeRO partitions)
Times are whole-process wall seconds, start-up included, so the differences are what to read:
  save overhead  A - C (the gathers and the write of full_state.safetensors)
  reshard cost   reshard - same shape
Disk: the tag's size and its full_state.safetensors. ZeRO's communication buckets are cut to
--bucket-elements (the JSON's 5e8 fp32 elements are 2 GB per bucket, more than a shared CPU host
spares). On 2 shared CPU cores the numbers show the mechanics, not a GPU cluster's speed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
import time
from pathlib import Path

from digits_trainer import ENV, REPO, digits_cmd


def trainer(args: argparse.Namespace, ranks: int, out: Path, *extra: str) -> float:
    """Wall seconds of one trainer run: one step at global batch 4, a checkpoint, `extra` flags."""
    flags = ["--global-batch-size", "4", "--max-steps", "1", "--log-every", "1", "--results-dir", str(out), *extra]
    began = time.perf_counter()
    cmd = digits_cmd(ranks, str(args.config), args.model, args.num_experts, args.image_size, *flags)
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"trainer failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - began


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
    """(bytes of the step-1 tag, bytes of its full_state.safetensors)."""
    tag = results / "checkpoints" / "step0000001"
    total = sum(p.stat().st_size for p in tag.rglob("*") if p.is_file())
    full = tag / "full_state.safetensors"
    return total, full.stat().st_size if full.is_file() else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="DiT-S/2")
    parser.add_argument("--num-experts", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=8)
    parser.add_argument("--zero", default="zero2")
    parser.add_argument("--bucket-elements", type=float, default=2e7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        args.config = small_buckets(REPO / "config" / f"{args.zero}.json", args.bucket_elements, Path(tmp))
        a, b, c = (Path(tmp) / name for name in "abc")
        write_a, write_b, write_c = (
            trainer(args, 2, a),
            trainer(args, 1, b),
            trainer(args, 2, c, "--elastic-checkpoints", "false"),
        )
        resume = ("--resume", "auto", "--export-only", "true")
        same = trainer(args, 2, a, *resume)
        reshard = trainer(args, 2, b, *resume)
        (size_a, full_a), (size_c, _) = tag_sizes(a), tag_sizes(c)
    mib = 1 / 2**20
    print(f"{args.model} {args.num_experts}E2A, {args.zero}, 2 CPU processes, image {args.image_size}")
    print(f"  1 step + save, 2 processes:  {write_a:6.1f} s with full state, {write_c:6.1f} s without")
    print(f"  save overhead of full state: {write_a - write_c:6.1f} s")
    print(f"  resume + export, same shape: {same:6.1f} s")
    print(f"  resume + export, reshard:    {reshard:6.1f} s (tag written by 1 process, {write_b:.1f} s)")
    print(f"  reshard cost:                {reshard - same:6.1f} s")
    print(
        f"  tag on disk: {size_a * mib:8.1f} MiB with full state ({full_a * mib:.1f} MiB of it), {size_c * mib:.1f} MiB without"
    )


if __name__ == "__main__":
    main()
