"""Sample many images for FID, sharded over processes, resumable, gathered into one ADM `.npz`.

    python -m dit_moe.sampling.many --ckpt FILE --num-samples 50000 --out samples/run1 \
        [--vae-path DIR|none] [--sampler ddpm|ddim|euler|heun|dpm++2m|dpm++3m|dpm++2m-sde|unipc|deis] \
        [--num-sampling-steps N] [--cfg-scale 1.5] [--guidance-interval LO,HI] [--cache experts:N] \
        [--batch-size 32] [--seed 0] [--label-mode cycle|random]
    torchrun --nproc_per_node 8 -m dit_moe.sampling.many ...     # or scripts/sample_ddp.sh
    python -m dit_moe.sampling.many ...                            # the same tool, its older name

Loading, the objective and every check are the prepare step's (prepare.py). Sample i has
seed `seed + i` and label `i % num_classes` (or a draw from seed + i), so its image does not
depend on the number of processes or the batch size (see images.py). Rank r draws indices
r, r + W, r + 2W, ... and writes `OUT/000123.png` atomically; indices whose PNG exists are
skipped, so a killed run resumes where it stopped. After a barrier, rank 0 writes `OUT.npz`
(ADM format: `arr_0` uint8 NHWC, `arr_1` labels) in index order. `OUT/sampling.json` records
the settings; resuming with different ones stops with an error. Rank 0 prints the model
evaluations and FLOPs per image of what it drew.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from ..cli import flag, run_main
from ..evaluation.npz import npz_from_png_folder, png_name, save_png, to_uint8_nhwc
from ..utils.atomic import write_text
from ..utils.errors import UserError
from ..utils.launch import LaunchEnv
from .flags import add_sampling_flags, request_from_args
from .images import LABEL_MODES, sample_labels
from .prepare import PreparedSampler, SamplingRequest, prepare_sampling, resolve_device

SETTINGS_FILE = "sampling.json"


def shard_indices(num_samples: int, rank: int, world_size: int) -> list[int]:
    """Sample indices of one rank: rank, rank + W, rank + 2W, ... below num_samples."""
    return list(range(rank, num_samples, world_size))


def pending_indices(out: Path, indices: Sequence[int]) -> list[int]:
    """The indices whose PNG is not written yet."""
    return [i for i in indices if not (out / png_name(i)).is_file()]


def check_settings(out: Path, settings: dict, write: bool) -> None:
    """Refuse to mix samples drawn with different settings in one folder; record them on first use."""
    path = out / SETTINGS_FILE
    settings = json.loads(json.dumps(settings))  # as stored: tuples become lists
    if path.is_file():
        stored = json.loads(path.read_text())
        changed = sorted(k for k in set(stored) | set(settings) if stored.get(k) != settings.get(k))
        if changed:
            raise UserError(
                f"{out} holds samples drawn with other settings ({', '.join(f'{k}: {stored.get(k)!r} -> {settings.get(k)!r}' for k in changed)}); "
                "use a new --out folder or the original settings."
            )
    elif write:
        write_text(path, json.dumps(settings, indent=2, sort_keys=True))


def default_npz_path(out: Path) -> Path:
    """DiT's convention: the sample folder's path plus `.npz`."""
    return out.with_name(out.name + ".npz")


@contextmanager
def process_group(env: LaunchEnv, device: torch.device) -> Iterator[None]:
    """Join the launch's process group for the run (nccl on GPUs, gloo on CPUs); nothing for one process."""
    if env.world_size == 1 or dist.is_initialized():
        yield
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=env.rank, world_size=env.world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _barrier(env: LaunchEnv) -> None:
    if env.world_size > 1:
        dist.barrier()


def sample_many(
    request: SamplingRequest,
    out: str | Path,
    num_samples: int,
    batch_size: int = 32,
    seed: int = 0,
    label_mode: str = "cycle",
    npz: Optional[str | Path] = None,
) -> Optional[Path]:
    """Draw this rank's missing samples into `out`, then (rank 0) gather all into the `.npz`; returns its path on rank 0."""
    return _sample_many(request, out, num_samples, batch_size, seed, label_mode, npz)[0]


def _sample_many(
    request: SamplingRequest,
    out: str | Path,
    num_samples: int,
    batch_size: int,
    seed: int,
    label_mode: str,
    npz: Optional[str | Path],
) -> tuple[Optional[Path], str]:
    """`sample_many`, also returning this rank's cost line (SamplingStats.describe)."""
    if num_samples < 1 or batch_size < 1:
        raise UserError(f"--num-samples and --batch-size must be positive, got {num_samples} and {batch_size}.")
    env, device = LaunchEnv.from_environ(), resolve_device(request.device)
    with process_group(env, device):
        prepared = prepare_sampling(dataclasses.replace(request, device=str(device)))
        out = Path(out)
        settings = dict(
            asdict(request.options),
            objective=prepared.objective_config.to_dict(),
            ckpt=str(Path(request.ckpt).resolve()),
            vae_path=prepared.vae_path,
            seed=seed,
            label_mode=label_mode,
            num_classes=prepared.config.num_classes,
            dtype=request.dtype,
        )
        out.mkdir(parents=True, exist_ok=True)
        check_settings(out, settings, write=env.rank == 0)
        labels = sample_labels(range(num_samples), prepared.config.num_classes, seed, label_mode)
        _draw_pngs(
            prepared,
            out,
            pending_indices(out, shard_indices(num_samples, env.rank, env.world_size)),
            labels,
            seed,
            batch_size,
            env.rank,
        )
        _barrier(env)  # every rank's PNGs are on disk before rank 0 reads them
        path = npz_from_png_folder(out, num_samples, npz or default_npz_path(out), labels) if env.rank == 0 else None
        _barrier(env)
    return path, prepared.stats.describe()


def _draw_pngs(
    prepared: PreparedSampler, out: Path, todo: list[int], labels: np.ndarray, seed: int, batch_size: int, rank: int
) -> None:
    """Sample the indices `todo` in batches and write each as `out/<index>.png`."""
    batches = [todo[i : i + batch_size] for i in range(0, len(todo), batch_size)]
    for batch in tqdm(batches, desc=f"rank {rank} sampling", disable=rank != 0):
        images = prepared.sample(labels[batch], [seed + i for i in batch])
        for index, image in zip(batch, to_uint8_nhwc(images)):
            save_png(image, out / png_name(index))


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_sampling_flags(parser)
    parser.add_argument(
        *flag("num-samples"),
        *flag("num-fid-samples"),
        dest="num_samples",
        type=int,
        default=50_000,
        help="images to sample over all ranks (default 50,000, the FID convention)",
    )
    parser.add_argument(
        *flag("out"), *flag("sample-dir"), dest="out", required=True, help="folder for the PNGs (resumable)"
    )
    parser.add_argument(*flag("npz"), default=None, help="where to write the .npz (default: OUT.npz)")
    parser.add_argument(
        *flag("batch-size"),
        *flag("per-proc-batch-size"),
        dest="batch_size",
        type=int,
        default=32,
        help="images per forward on each rank",
    )
    parser.add_argument(
        *flag("label-mode"),
        choices=LABEL_MODES,
        default="cycle",
        help="cycle: image i has class i mod num_classes (balanced); random: a uniform draw per image from seed + i (DiT's sample_ddp.py)",
    )
    return parser


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    """Parse the command line and sample; bad input exits 2 with one sentence on stderr."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)

    def work() -> None:
        path, cost = _sample_many(
            request_from_args(args), args.out, args.num_samples, args.batch_size, args.seed, args.label_mode, args.npz
        )
        if path is not None:
            print(f"Saved {args.num_samples} samples to {path} ({cost} of those drawn here)")

    return run_main(work, prog=parser.prog)


if __name__ == "__main__":
    sys.exit(main(prog="python -m dit_moe.sampling.many"))
