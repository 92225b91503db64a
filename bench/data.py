"""Latent-shard loader throughput on this machine.

    python bench/data.py [--samples 4096 --shard-size 256 --latent-size 32 --batch-size 64]

Writes synthetic shards (SD-VAE latent shape 4 x 32 x 32 by default, i.e. 256 px images)
with the extraction's shard writer into a temporary folder, then times the training
loader with 0 and 2 workers and prints samples/s.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

from dit_moe.data import DataConfig, build_train_loader
from dit_moe.data.shards import Manifest, shard_name, write_shard


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--shard-size", type=int, default=256)
    parser.add_argument("--latent-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
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


if __name__ == "__main__":
    main()
