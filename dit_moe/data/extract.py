"""Encode an image folder once into webdataset latent shards (fast-DiT's extract_features, sharded).

    python -m dit_moe.data.extract --data-path DIR --vae-path DIR --features-path OUT --image-size 256
    torchrun --nproc_per_node 8 -m dit_moe.data.extract ...   # shard i is encoded by rank i % world

Both the image and its horizontal flip are encoded, and the posterior (mean, std) is
stored, so random flips and latent sampling stay load-time choices. Ranks need no
communication: the shard -> rank assignment is fixed, shard contents are fixed by the
dataset index, and finished shards are skipped, so an interrupted run is resumed by
running the same command again.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from dataclasses import dataclass
from typing import List, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from dit_moe.cli import default_device, flag, run_main
from dit_moe.data.folder import ImageFolderDataset
from dit_moe.data.shards import Manifest, shard_name, write_shard
from dit_moe.data.transforms import hflip
from dit_moe.data.vae import SD_VAE_SCALE_FACTOR, is_pixel_space, load_codec
from dit_moe.hub import resolve_vae
from dit_moe.utils.launch import LaunchEnv


@dataclass
class ExtractConfig:
    data_path: str
    vae_path: str
    features_path: str
    image_size: int = 256
    shard_size: int = 1000  # samples per tar shard
    batch_size: int = 32  # images per encoder call (x2 with the flips)
    num_workers: int = 4  # image-decoding worker processes
    scale_factor: float = SD_VAE_SCALE_FACTOR  # recorded in the manifest; the loader multiplies by it

    def __post_init__(self):
        if self.shard_size < 1 or self.batch_size < 1:
            raise ValueError(
                f"--shard-size and --batch-size must be positive, got {self.shard_size} and {self.batch_size}."
            )


def _manifest_for(cfg: ExtractConfig, dataset: ImageFolderDataset, codec) -> Manifest:
    size = codec.latent_size(cfg.image_size)
    return Manifest(
        num_samples=len(dataset),
        shard_size=cfg.shard_size,
        latent_shape=[codec.latent_channels, size, size],
        num_classes=dataset.num_classes,
        image_size=cfg.image_size,
        vae_path=os.path.abspath(cfg.vae_path) if not is_pixel_space(cfg.vae_path) else "none",
        vae_name=os.path.basename(os.path.normpath(cfg.vae_path)),
        scale_factor=1.0 if is_pixel_space(cfg.vae_path) else cfg.scale_factor,
        classes=dataset.classes,
    )


def _agree_on_manifest(cfg: ExtractConfig, manifest: Manifest) -> None:
    """Write the manifest, or check that an existing one (an earlier run) describes the same extraction."""
    try:
        existing = Manifest.load(cfg.features_path)
    except FileNotFoundError:
        manifest.save(cfg.features_path)
        return
    theirs, ours = dataclasses.asdict(existing), dataclasses.asdict(manifest)
    differ = [k for k in ours if k != "vae_path" and theirs[k] != ours[k]]
    if differ:
        raise ValueError(
            f"{cfg.features_path!r} already holds shards made with different settings ({', '.join(differ)}); "
            f"use a new --features-path or the same arguments as before."
        )


def run_extraction(
    cfg: ExtractConfig, rank: int = 0, world_size: int = 1, codec=None, device: Optional[torch.device] = None
) -> List[int]:
    """Encode the shards owned by `rank` that are not on disk yet; returns their numbers.

    `codec` defaults to `load_codec(cfg.vae_path, cfg.scale_factor)` on `device`.
    """
    device = device or torch.device("cpu")
    codec = (codec or load_codec(cfg.vae_path, cfg.scale_factor)).to(device)
    dataset = ImageFolderDataset(cfg.data_path, cfg.image_size, random_flip=False)
    manifest = _manifest_for(cfg, dataset, codec)
    os.makedirs(cfg.features_path, exist_ok=True)
    _agree_on_manifest(cfg, manifest)

    todo = [
        s
        for s in range(rank, manifest.num_shards, world_size)
        if not os.path.isfile(os.path.join(cfg.features_path, shard_name(s)))
    ]
    progress = tqdm(
        total=sum(len(manifest.shard_range(s)) for s in todo),
        unit="img",
        desc=f"extract rank {rank}",
        disable=rank != 0,
    )
    for shard in todo:
        indices = manifest.shard_range(shard)
        loader = DataLoader(Subset(dataset, indices), batch_size=cfg.batch_size, num_workers=cfg.num_workers)
        write_shard(
            os.path.join(cfg.features_path, shard_name(shard)),
            _encode_batches(loader, indices, codec, device, progress),
        )
    progress.close()
    return todo


def _encode_batches(loader, indices, codec, device, progress):
    """Yield (index, mean (2, C, H, W), std (2, C, H, W), label) for [image, flipped image] pairs."""
    position = 0
    for x, y in loader:
        x = x.to(device)
        mean, std = codec.encode_distribution(torch.cat([x, hflip(x)]))  # (2N, C, H, W)
        mean = mean.float().cpu().view(2, len(x), *mean.shape[1:]).transpose(0, 1).numpy()  # -> (N, 2, C, H, W)
        std = std.float().cpu().view(2, len(x), *std.shape[1:]).transpose(0, 1).numpy()
        for i in range(len(x)):
            yield indices[position + i], mean[i].astype(np.float16), std[i].astype(np.float16), int(y[i])
        position += len(x)
        progress.update(len(x))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dit_moe.data.extract", description=__doc__.split("\n\n")[0])
    parser.add_argument(*flag("data-path"), required=True, help="image folder, one sub-folder per class")
    parser.add_argument(
        *flag("vae-path"),
        required=True,
        help="diffusers AutoencoderKL folder, DiT's ema|mse or a Hugging Face id (fetched once "
        "into its cache), or 'none' for pixels",
    )
    parser.add_argument(
        *flag("features-path"),
        *flag("feature-path"),
        dest="features_path",
        required=True,
        help="output folder for the shards and manifest.json",
    )
    parser.add_argument(*flag("image-size"), type=int, default=256, help="ADM centre crop side in pixels (default 256)")
    parser.add_argument(*flag("shard-size"), type=int, default=1000, help="samples per webdataset shard")
    parser.add_argument(*flag("batch-size"), type=int, default=32, help="images per VAE forward")
    parser.add_argument(*flag("num-workers"), type=int, default=4, help="image-decoding worker processes")
    parser.add_argument(
        *flag("vae-scale-factor"),
        type=float,
        default=SD_VAE_SCALE_FACTOR,
        help="latent scale recorded in the manifest (SD VAE: 0.18215)",
    )
    return parser


def parse_args(argv=None) -> ExtractConfig:
    args = build_parser().parse_args(argv)
    return ExtractConfig(
        args.data_path,
        resolve_vae(args.vae_path),
        args.features_path,
        args.image_size,
        args.shard_size,
        args.batch_size,
        args.num_workers,
        args.vae_scale_factor,
    )


def main(argv=None) -> int:
    """Encode this rank's shards; bad input (missing folder, changed settings) exits 2 with one sentence."""

    def work() -> None:
        cfg = parse_args(argv)
        env = LaunchEnv.from_environ()
        run_extraction(cfg, env.rank, env.world_size, device=default_device(env.local_rank))

    return run_main(work, prog="python -m dit_moe.data.extract")


if __name__ == "__main__":
    sys.exit(main())
