"""What a checkpoint costs each rank, with the resumable state on and off: host memory, bytes, time.

    python bench/checkpoint_scale.py [--ranks 2 4] [--models DiT-T/2 DiT-S/2 DiT-B/2] [--num-experts 4]
    python bench/checkpoint_scale.py --ranks 4 --models DiT-S/2@256    # a preset at another width

For every (processes, model, --elastic-checkpoints) the trainer's own setup runs on the built-in digits
(DS_ACCELERATOR=cpu, gloo, ZeRO-2): one optimizer step, then on every rank, timed and measured by the
growth of the process's peak resident memory (ru_maxrss: memory the save needed beyond what training had
already used), `Checkpointer.save` and `Checkpointer.export`; a second launch on the same shape times
`Checkpointer.load` of that tag. Bytes written per rank are read from the tag: the files named by a rank
(state_rankR, zero_pp_rank_R_*, rng_rankR) are that rank's, the rest (DeepSpeed's model file, EMA,
configs) rank 0's. Every number is printed beside the same run's state-off figure, as a ratio.

The per-rank formula the docs extrapolate (P parameters, W ranks, T the largest tensor, 4 B each):
  resumable state written and held while saving   12 P / W   (fp32 master + Adam's two moments)
  EMA held while saving                           4 P / W on every rank, + T on rank 0 (streamed)
  export on rank 0                                one shard (5 GB) + T
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "bench")]

from digits_trainer import ENV, digits_cmd  # noqa: E402


def _peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _timed(action) -> tuple[float, int]:
    """(seconds, growth of the peak resident memory) of `action()`."""
    before, began = _peak_bytes(), time.perf_counter()
    action()
    return time.perf_counter() - began, _peak_bytes() - before


def worker(report: Path, argv: list[str]) -> None:
    """One rank: the trainer's setup, then (fresh) a step, save and export, or (--resume) the load."""
    import torch.distributed as dist

    from dit_moe.train import loop
    from dit_moe.train.config import load_config
    from dit_moe.train.metrics import LoadTracker, Window

    run = loop.setup(load_config(argv))
    record: dict = {"rank": run.ranks.rank}
    if run.resume_from is not None:
        record["load_s"], record["load_peak"] = _timed(lambda: run.checkpointer.load(run.resume_from))
    else:
        run.engine.train()
        loop.train_step(run, Window(LoadTracker(run.engine.module, run.device)))
        client = {"step": run.step, "data": run.loader.state_dict()}
        record["save_s"], record["save_peak"] = _timed(lambda: run.checkpointer.save(run.step, client))
        record["export_s"], record["export_peak"] = _timed(run.checkpointer.export)
        record["params"] = loop.num_parameters(run.engine.module)
    dist.barrier()
    with open(report, "a") as handle:
        handle.write(json.dumps(record) + "\n")


def _model_flags(model: str) -> tuple[str, tuple[str, ...]]:
    """A preset name, or NAME@WIDTH for the preset at another hidden size (64 channels per head)."""
    name, _, width = model.partition("@")
    return name, ("--hidden-size", width, "--num-heads", str(int(width) // 64)) if width else ()


def _launch(ranks: int, model: str, args: argparse.Namespace, out: Path, report: Path, *flags: str) -> list[dict]:
    report.unlink(missing_ok=True)
    name, width = _model_flags(model)
    flags = ("--global-batch-size", str(2 * ranks), "--max-steps", "1", "--results-dir", str(out), *width, *flags)
    cmd = digits_cmd(ranks, "config/zero2.json", name, args.num_experts, args.image_size, *flags)
    script = cmd.index("train_deepspeed.py")
    cmd[script : script + 1] = ["bench/checkpoint_scale.py", "--worker", str(report)]
    proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"trainer failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return sorted((json.loads(line) for line in report.read_text().splitlines()), key=lambda r: r["rank"])


def bytes_per_rank(tag: Path, ranks: int) -> list[int]:
    """Bytes of the tag's files by the rank that wrote them (files no rank names: rank 0's)."""
    written = [0] * ranks
    for path in tag.iterdir():
        match = re.search(r"(?:state_rank|rng_rank|zero_pp_rank_)(\d+)", path.name)
        written[int(match.group(1)) if match else 0] += path.stat().st_size
    return written


def measure(ranks: int, model: str, elastic: bool, args: argparse.Namespace, tmp: Path) -> list[dict]:
    out = tmp / f"{ranks}_{model.replace('/', '_').replace('@', '_')}_{elastic}"
    report = tmp / "report.jsonl"
    flags = ("--elastic-checkpoints", str(elastic).lower())
    saved = _launch(ranks, model, args, out, report, *flags)
    loaded = _launch(ranks, model, args, out, report, *flags, "--resume", "auto")
    written = bytes_per_rank(out / "checkpoints" / "step0000001", ranks)
    return [s | l | {"bytes": b} for s, l, b in zip(saved, loaded, written)]


def _row(label: str, rows: list[dict], base: list[dict]) -> str:
    mib = 2**20
    top = max(range(len(rows)), key=lambda r: rows[r]["save_peak"])
    cells = [
        f"save {max(r['save_s'] for r in rows):6.2f} s ({max(r['save_s'] for r in rows) / max(r['save_s'] for r in base):.2f}x)",
        f"load {max(r['load_s'] for r in rows):6.2f} s",
        f"save peak +{rows[top]['save_peak'] / mib:6.1f} MiB (rank {top})",
        f"export peak +{rows[0]['export_peak'] / mib:6.1f} MiB (rank 0)",
        "bytes/rank " + " ".join(f"{r['bytes'] / mib:.1f}" for r in rows) + " MiB",
    ]
    return f"    {label:<10}" + " | ".join(cells)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--models", nargs="+", default=["DiT-T/2", "DiT-S/2", "DiT-B/2"], help="NAME or NAME@WIDTH")
    parser.add_argument("--num-experts", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for ranks in args.ranks:
            for model in args.models:
                off = measure(ranks, model, False, args, Path(tmp))
                on = measure(ranks, model, True, args, Path(tmp))
                print(f"{model} {args.num_experts}E2A, {off[0]['params']:,} parameters, {ranks} CPU ranks, ZeRO-2:")
                print(_row("state off", off, off))
                print(_row("state on", on, off))


if __name__ == "__main__":
    if "--worker" in sys.argv:  # a rank launched by `_launch` (the launcher puts --local_rank first)
        rest = [arg for arg in sys.argv[1:] if not arg.startswith("--local_rank")]
        worker(Path(rest[1]), rest[2:])
    else:
        main()
