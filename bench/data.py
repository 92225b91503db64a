"""Latent-shard loader throughput, or the trainer's start-up data check, on this machine.

    python bench/data.py [--samples 4096 --shard-size 256 --latent-size 32 --batch-size 64]
    python bench/data.py --start-check [--samples 1281167 --shard-size 1000 --npy-samples 131072 --ranks 2
                                        --latent-size 8 --dir DIR]

Throughput: writes synthetic shards (SD-VAE latent shape 4 x 32 x 32 by default, i.e. 256 px images)
with the extraction's shard writer into a temporary folder, then times the training loader with 0 and 2
workers and prints samples/s.

--start-check: writes an ImageNet-sized shard set and a fast-DiT `.npy` folder, then times, per rank, the
check every rank ran before (all files, one process: `Manifest.check_shards`, `NpyFeatureDataset.check`)
against `check_features` on its share at a first start (no verdicts) and a second start (verdicts cached).
The check reads tar and `.npy` headers, never latents, so its cost is set by the number of files and tar
members, not the latent size: 4 x 8 x 8 latents keep the shard set at ~6.6 GB. The data were just written,
so every timed run finds them in the page cache: the figures compare CPU and system-call cost, not storage.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import tarfile
import tempfile
import time
from typing import Callable

import numpy as np

from dit_moe.data import DataConfig, NpyFeatureDataset, build_train_loader
from dit_moe.data.check import check_features
from dit_moe.data.shards import LATENT_DTYPE, Manifest, sample_key, shard_name, write_shard
from dit_moe.data.verdicts import CACHE_DIR


def write_synthetic_shards(root: str, samples: int, shard_size: int, latent_shape: tuple) -> None:
    rng = np.random.default_rng(0)
    manifest = Manifest(
        samples, shard_size, list(latent_shape), 1000, 8 * latent_shape[-1], "none", "synthetic", 0.18215
    )
    for shard in range(manifest.num_shards):
        write_shard(
            os.path.join(root, shard_name(shard)),
            (
                (i, rng.standard_normal((2, *latent_shape)), np.abs(rng.standard_normal((2, *latent_shape))), i % 1000)
                for i in manifest.shard_range(shard)
            ),
        )
    manifest.save(root)


def time_loader(cfg: DataConfig, batch_size: int, batches: int) -> float:
    """Samples per second over `batches` batches, after one warm-up batch (worker start-up excluded)."""
    loader = build_train_loader(cfg, 0, 1, batch_size, seed=0)
    next(loader)
    start = time.perf_counter()
    for _ in range(batches):
        next(loader)
    return batches * batch_size / (time.perf_counter() - start)


def write_check_shards(root: str, samples: int, shard_size: int, latent_shape: tuple) -> None:
    """Shards whose members have the extraction's names and sizes (one array's bytes reused: the check reads
    headers only); written with tarfile directly, as writing 1.28M samples through the real writer takes long."""
    manifest = Manifest(samples, shard_size, list(latent_shape), 1000, 8 * latent_shape[-1], "none", "synthetic", 1.0)
    stream = io.BytesIO()
    np.lib.format.write_array(stream, np.zeros((2, *latent_shape), dtype=LATENT_DTYPE))
    latent = stream.getvalue()
    for shard in range(manifest.num_shards):
        with tarfile.open(os.path.join(root, shard_name(shard)), "w", format=tarfile.USTAR_FORMAT) as tar:
            for index in manifest.shard_range(shard):
                for suffix, data in (("cls", str(index % 1000).encode()), ("mean.npy", latent), ("std.npy", latent)):
                    info = tarfile.TarInfo(f"{sample_key(index)}.{suffix}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    manifest.save(root)


def write_check_npy(root: str, samples: int, latent_shape: tuple) -> None:
    """fast-DiT's layout: imagenet256_features/<n>.npy (1, C, H, W) float32 and imagenet256_labels/<n>.npy (1,)."""
    features, labels = os.path.join(root, "imagenet256_features"), os.path.join(root, "imagenet256_labels")
    os.makedirs(features)
    os.makedirs(labels)
    feature, label = np.zeros((1, *latent_shape), dtype=np.float32), np.zeros(1, dtype=np.int64)
    for n in range(samples):
        np.save(os.path.join(features, f"{n}.npy"), feature)
        np.save(os.path.join(labels, f"{n}.npy"), label)


def seconds(work: Callable[[], object]) -> tuple[float, float, object]:
    """(wall seconds, CPU seconds of this process, result) of `work()`: on a shared machine the CPU time is
    the steadier figure of the two."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = work()
    return time.perf_counter() - wall, time.process_time() - cpu, result


def time_start_check(cfg: DataConfig, baseline: Callable[[], object], ranks: int) -> None:
    """Print the one-process check every rank used to run, then each rank's first and second start."""
    wall, cpu, _ = seconds(baseline)
    print(f"  every rank before (all files): {wall:.2f} s wall, {cpu:.2f} s CPU")
    shutil.rmtree(os.path.join(cfg.features_path, CACHE_DIR), ignore_errors=True)
    for start in ("first", "second"):
        for rank in range(ranks):
            rank_wall, rank_cpu, summary = seconds(lambda: check_features(cfg, rank, ranks))
            print(
                f"  {start} start, rank {rank} of {ranks}: {rank_wall:.2f} s wall ({rank_wall / wall:.0%} of before), "
                f"{rank_cpu:.2f} s CPU ({rank_cpu / cpu:.0%}); {summary.checked} files read, "
                f"{summary.cached} unchanged since they passed"
            )


def start_check(args: argparse.Namespace) -> None:
    shape = (4, args.latent_size, args.latent_size)
    root = tempfile.mkdtemp(dir=args.dir)
    try:
        shards, npy = os.path.join(root, "shards"), os.path.join(root, "npy")
        os.makedirs(shards)
        began = time.perf_counter()
        write_check_shards(shards, args.samples, args.shard_size, shape)
        write_check_npy(npy, args.npy_samples, shape)
        print(f"wrote the data in {time.perf_counter() - began:.0f} s; {os.cpu_count()} CPUs")
        cfg = DataConfig("latents", features_path=shards, image_size=8 * args.latent_size)
        print(f"latent shards: {args.samples} samples of {shape}, {-(-args.samples // args.shard_size)} shards")
        time_start_check(cfg, lambda: Manifest.load(shards).check_shards(shards), args.ranks)
        cfg = DataConfig("npy", features_path=npy, num_classes=1000)
        print(f"fast-DiT .npy: {args.npy_samples} samples of {(1, *shape)}, {2 * args.npy_samples} files")
        time_start_check(cfg, lambda: NpyFeatureDataset(npy).check(), args.ranks)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def throughput(args: argparse.Namespace) -> None:
    shape = (4, args.latent_size, args.latent_size)
    with tempfile.TemporaryDirectory() as root:
        write_synthetic_shards(root, args.samples, args.shard_size, shape)
        batches = args.samples // args.batch_size - 2
        print(
            f"latent shards: {args.samples} samples of {shape} fp16 mean+std x2 views, "
            f"{args.samples // args.shard_size} shards, batch {args.batch_size}, {os.cpu_count()} CPUs"
        )
        for workers in (0, 2):
            cfg = DataConfig("latents", features_path=root, image_size=8 * args.latent_size, num_workers=workers)
            print(f"  num_workers={workers}: {time_loader(cfg, args.batch_size, batches):,.0f} samples/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--start-check", action="store_true", help="time the start-up data check instead")
    parser.add_argument("--samples", type=int, default=None, help="default: 4096, or 1281167 with --start-check")
    parser.add_argument("--shard-size", type=int, default=None, help="default: 256, or 1000 with --start-check")
    parser.add_argument("--latent-size", type=int, default=None, help="default: 32, or 8 with --start-check")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--npy-samples", type=int, default=131072)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--dir", default=None, help="where to write the data (default: the system's temp folder)")
    args = parser.parse_args()
    defaults = (1_281_167, 1000, 8) if args.start_check else (4096, 256, 32)
    for name, default in zip(("samples", "shard_size", "latent_size"), defaults):
        if getattr(args, name) is None:
            setattr(args, name, default)
    (start_check if args.start_check else throughput)(args)


if __name__ == "__main__":
    main()
