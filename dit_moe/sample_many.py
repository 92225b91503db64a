"""Sample many images for FID, sharded over processes, resumable, gathered into one ADM `.npz`.

    python -m dit_moe.sample_many --ckpt FILE --num-samples 50000 --out samples/run1 \
        [--vae-path DIR|none] [--sampler ddpm|ddim|euler|heun] [--num-sampling-steps N] \
        [--cfg-scale 1.5] [--batch-size 32] [--seed 0] [--label-mode cycle|random]
    torchrun --nproc_per_node 8 -m dit_moe.sample_many ...       # or scripts/sample_ddp.sh

Sample i has seed `seed + i` and label `i % num_classes` (or a draw from seed + i), so its
image does not depend on the number of processes or the batch size (see dit_moe.sampling).
Rank r draws indices r, r + W, r + 2W, ... and writes `OUT/000123.png` (temp file + rename);
indices whose PNG exists are skipped, so a killed run resumes where it stopped. After a
barrier, rank 0 writes `OUT.npz` (ADM format: `arr_0` uint8 NHWC, `arr_1` labels) in index order.
`OUT/sampling.json` records the settings; resuming with different ones stops with an error.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm.auto import tqdm

from .checkpoint import load_model
from .evaluation.npz import npz_from_png_folder, png_name, to_uint8_nhwc
from .sampling import LABEL_MODES, SamplingOptions, build_sampling_objective, check_codec, sample_images, sample_labels
from .vae import PIXEL_SPACE, load_codec

SETTINGS_FILE = "sampling.json"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class DistributedContext:
    """This process's place in the launch (torchrun's RANK / WORLD_SIZE / LOCAL_RANK)."""

    rank: int
    world_size: int
    device: torch.device

    @classmethod
    def from_env(cls, device: Optional[str] = None) -> "DistributedContext":
        """Read the launcher's environment and join the process group (nccl on GPUs, gloo on CPUs)."""
        rank, world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        if device is None:
            device = f"cuda:{local_rank % torch.cuda.device_count()}" if torch.cuda.is_available() else "cpu"
        context = cls(rank, world_size, torch.device(device))
        if world_size > 1 and not dist.is_initialized():
            if context.device.type == "cuda":
                torch.cuda.set_device(context.device)
            dist.init_process_group("nccl" if context.device.type == "cuda" else "gloo", rank=rank, world_size=world_size)
        return context

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def close(self) -> None:
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def shard_indices(num_samples: int, rank: int, world_size: int) -> list[int]:
    """Sample indices of one rank: rank, rank + W, rank + 2W, ... below num_samples."""
    return list(range(rank, num_samples, world_size))


def pending_indices(out: Path, indices: Sequence[int]) -> list[int]:
    """The indices whose PNG is not written yet."""
    return [i for i in indices if not (out / png_name(i)).is_file()]


def save_png(image: np.ndarray, path: Path) -> None:
    """One uint8 HWC image as a PNG (grey for 1 channel), written atomically so resume never trusts a partial file."""
    tmp = path.with_name(path.name + ".tmp")
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(tmp, format="PNG")
    os.replace(tmp, path)


def check_settings(out: Path, settings: dict, write: bool) -> None:
    """Refuse to mix samples drawn with different settings in one folder; record them on first use."""
    path = out / SETTINGS_FILE
    if path.is_file():
        stored = json.loads(path.read_text())
        changed = sorted(k for k in set(stored) | set(settings) if stored.get(k) != settings.get(k))
        if changed:
            raise ValueError(
                f"{out} holds samples drawn with other settings ({', '.join(f'{k}: {stored.get(k)!r} -> {settings.get(k)!r}' for k in changed)}); "
                "use a new --out folder or the original settings."
            )
    elif write:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(settings, indent=2, sort_keys=True))
        os.replace(tmp, path)


def default_npz_path(out: Path) -> Path:
    """DiT's convention: the sample folder's path plus `.npz`."""
    return out.with_name(out.name + ".npz")


def sample_many(args: argparse.Namespace) -> Optional[Path]:
    """Run the sharded sampling described by parsed CLI `args`; returns the `.npz` path on rank 0, else None."""
    context = DistributedContext.from_env(args.device)
    try:
        return _sample_many(args, context)
    finally:
        context.close()


def _sample_many(args: argparse.Namespace, context: DistributedContext) -> Optional[Path]:
    out = Path(args.out)
    options = SamplingOptions(
        sampler=args.sampler,
        num_steps=args.num_sampling_steps,
        cfg_scale=args.cfg_scale,
        cfg_channels=args.cfg_channels,
        noise_schedule=args.noise_schedule,
        diffusion_steps=args.diffusion_steps,
    )
    overrides = {"objective": args.objective} if args.objective else {}
    model = load_model(args.ckpt, device=context.device, **overrides)
    codec = load_codec(args.vae_path, channels=model.config.in_channels).to(context.device)
    check_codec(model.config, codec)
    objective = build_sampling_objective(model.config, options)
    if options.sampler is not None and options.sampler not in objective.samplers:
        raise ValueError(f"--sampler {options.sampler} cannot sample {objective.description}; use {' or '.join(objective.samplers)}.")
    settings = dict(
        asdict(options), ckpt=str(Path(args.ckpt).resolve()), vae_path=str(args.vae_path), seed=args.seed,
        label_mode=args.label_mode, num_classes=model.config.num_classes, dtype=args.dtype,
    )
    out.mkdir(parents=True, exist_ok=True)
    check_settings(out, settings, write=context.rank == 0)

    labels = sample_labels(range(args.num_samples), model.config.num_classes, args.seed, args.label_mode)
    todo = pending_indices(out, shard_indices(args.num_samples, context.rank, context.world_size))
    batches = [todo[i : i + args.batch_size] for i in range(0, len(todo), args.batch_size)]
    for batch in tqdm(batches, desc=f"rank {context.rank} sampling", disable=context.rank != 0):
        images = sample_images(
            model, codec, labels[batch], [args.seed + i for i in batch], options,
            device=context.device, dtype=DTYPES[args.dtype], objective=objective,
        )
        for index, image in zip(batch, to_uint8_nhwc(images)):
            save_png(image, out / png_name(index))

    context.barrier()  # every rank's PNGs are on disk before rank 0 reads them
    npz = None
    if context.rank == 0:
        npz = npz_from_png_folder(out, args.num_samples, args.npz or default_npz_path(out), labels)
        print(f"Saved {args.num_samples} samples to {npz}")
    context.barrier()
    return npz


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="any checkpoint dit_moe.checkpoint.load_model reads")
    parser.add_argument("--num-samples", "--num_samples", "--num-fid-samples", "--num_fid_samples", dest="num_samples", type=int, default=50_000)
    parser.add_argument("--out", "--sample-dir", "--sample_dir", dest="out", required=True, help="folder for the PNGs (resumable)")
    parser.add_argument("--npz", default=None, help="where to write the .npz (default: OUT.npz)")
    parser.add_argument("--vae-path", "--vae_path", dest="vae_path", default=PIXEL_SPACE, help="diffusers AutoencoderKL folder, or 'none' for pixel-space models")
    parser.add_argument("--objective", choices=["iddpm", "flow"], default=None, help="override what the checkpoint records (files without a config default to iddpm)")
    parser.add_argument("--sampler", choices=["ddpm", "ddim", "euler", "heun"], default=None, help="default: ddpm (IDDPM models), euler (flow models)")
    parser.add_argument("--num-sampling-steps", "--num_sampling_steps", dest="num_sampling_steps", type=int, default=None, help="default: 250 (IDDPM), 50 (flow)")
    parser.add_argument("--cfg-scale", "--cfg_scale", dest="cfg_scale", type=float, default=1.5)
    parser.add_argument("--cfg-channels", "--cfg_channels", dest="cfg_channels", type=int, default=None, help="guided channels; default all, 3 = DiT's forward_with_cfg")
    parser.add_argument("--noise-schedule", "--noise_schedule", dest="noise_schedule", choices=["linear", "cosine"], default="linear", help="IDDPM models only")
    parser.add_argument("--diffusion-steps", "--diffusion_steps", dest="diffusion_steps", type=int, default=1000, help="IDDPM models only")
    parser.add_argument("--batch-size", "--batch_size", "--per-proc-batch-size", "--per_proc_batch_size", dest="batch_size", type=int, default=32)
    parser.add_argument("--seed", "--global-seed", "--global_seed", dest="seed", type=int, default=0, help="sample i uses seed + i")
    parser.add_argument("--label-mode", "--label_mode", dest="label_mode", choices=LABEL_MODES, default="cycle")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="model compute precision (autocast)")
    parser.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK when a GPU is present, else cpu")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> Optional[Path]:
    args = build_parser().parse_args(argv)
    if args.num_samples < 1 or args.batch_size < 1:
        raise SystemExit(f"--num-samples and --batch-size must be positive, got {args.num_samples} and {args.batch_size}.")
    try:
        return sample_many(args)
    except (FileNotFoundError, ValueError) as err:  # bad checkpoint, VAE path, sampler or settings: one sentence
        raise SystemExit(f"error: {err}") from err


if __name__ == "__main__":
    main()
