"""Sample a PNG grid of chosen classes from any checkpoint `load_model` reads: the work behind `sample.py`.

    python sample.py --model DiT-XL/2 --ckpt FILE --vae-path DIR --image-size 256 --cfg-scale 1.5
    python sample.py --ckpt results/run/checkpoints --class-labels 0,1,2,3 --sampler heun --out grid.png
    python -m dit_moe.sample_grid ...                       # the same tool

Choices where DiT's and DiT-MoE's sample.py differ, or where this tool adds a check:

- `--cfg-scale` defaults to 1.5, the value of DiT-MoE's README command (DiT's sample.py uses 4.0).
- Image i of the grid uses seed `--seed + i` through `dit_moe.sampling.sample_images`, the path
  `dit_moe.sample_many` shares; an image does not depend on how many others are in the grid.
- The objective comes from the checkpoint when it records one (our exports and DeepSpeed
  checkpoints); `--rf` must then agree, because sampling a rectified-flow model with DDPM
  gives NaNs (a known DiT-MoE trap). Files without a config (official DiT, feizc/DiT-MoE)
  are IDDPM models unless `--rf True` says they were trained with rectified flow.
- `--vae-path` left out means pixel space for 1- and 3-channel models; a latent model
  without it stops with an error rather than guessing a VAE.
- `--dtype bf16|fp16` runs the model under CUDA autocast; on the CPU it stops with an
  error (use fp32) instead of silently changing precision.
- The grid is DiT's `save_image(samples, nrow=4, padding=2)` layout: black 2-pixel gaps,
  [-1, 1] mapped to uint8 as DiT's sample_ddp.py does; written atomically (temp + rename).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from .checkpoint import load_model, read_checkpoint
from .diffusion import Objective
from .evaluation.npz import to_uint8_nhwc
from .models import DiT_models, DiTConfig, preset_name
from .sample_many import DTYPES, save_png
from .sampling import SamplingOptions, build_sampling_objective, check_codec, sample_images
from .vae import PIXEL_SPACE, check_vae_path, dit_vae_flag, is_pixel_space, load_codec

IMAGENET_LABELS = (207, 360, 387, 974, 88, 979, 417, 279)  # DiT's sample.py default classes
DEFAULT_CFG_SCALE = 1.5
GRID_NROW = 4
GRID_PADDING = 2
MIN_DEFAULT_IMAGES, MAX_DEFAULT_IMAGES = 8, 16
IMAGE_CHANNELS = (1, 3)


@dataclass
class SampleGrid:
    """What `sample_grid` produced: the PNG, the images in it and how they were drawn."""

    path: Path
    images: torch.Tensor  # (N, C, H, W) float32 in [-1, 1], CPU
    labels: list[int]
    objective: str  # "iddpm" | "flow"
    sampler: str
    num_steps: int


def default_labels(num_classes: int) -> list[int]:
    """DiT's eight ImageNet classes for 1000-class models; else 0, 1, ... cycled to fill whole
    grid rows (4 per row), at least 8 and at most 16 images."""
    if num_classes >= 1000:
        return list(IMAGENET_LABELS)
    count = min(MAX_DEFAULT_IMAGES, max(MIN_DEFAULT_IMAGES, GRID_NROW * math.ceil(num_classes / GRID_NROW)))
    return [i % num_classes for i in range(count)]


def image_grid(images: torch.Tensor | np.ndarray, nrow: int = GRID_NROW, padding: int = GRID_PADDING,
               scale: int = 1) -> np.ndarray:
    """One uint8 HWC image holding `images` (float NCHW in [-1, 1], or uint8 NHWC) in rows of `nrow`,
    `padding` black pixels around and between them (torchvision's make_grid layout); `scale`
    enlarges each image by pixel repetition first, so tiny samples (8x8 digits) stay visible."""
    tiles = to_uint8_nhwc(images)
    if scale > 1:
        tiles = tiles.repeat(scale, axis=1).repeat(scale, axis=2)  # (N, H*s, W*s, C), nearest neighbour
    n, h, w, c = tiles.shape
    cols = min(nrow, n)
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * (h + padding) + padding, cols * (w + padding) + padding, c), dtype=np.uint8)
    for i, tile in enumerate(tiles):
        top, left = padding + (i // cols) * (h + padding), padding + (i % cols) * (w + padding)
        grid[top : top + h, left : left + w] = tile
    return grid


def save_grid(images: torch.Tensor | np.ndarray, path: str | Path, nrow: int = GRID_NROW, scale: int = 1) -> Path:
    """Write `image_grid(images, nrow, scale=scale)` as a PNG, atomically; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_png(image_grid(images, nrow, scale=scale), path)
    return path


def parse_labels(text: str) -> list[int]:
    """Class ids from "207,360,387" (spaces allowed)."""
    try:
        labels = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected class ids such as 207,360,387, got {text!r}") from None
    if not labels:
        raise argparse.ArgumentTypeError("expected at least one class id, e.g. 207,360,387")
    return labels


def parse_bool(text: str) -> bool:
    """True/False as DiT-MoE's `--rf True` spells it (also 1/0, yes/no, any case)."""
    value = text.strip().lower()
    if value in ("true", "1", "yes", "y"):
        return True
    if value in ("false", "0", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


def _check_device(device: torch.device, dtype: str) -> None:
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device} asks for a GPU but CUDA is not available; pass --device cpu.")
    if dtype != "fp32" and device.type != "cuda":
        raise ValueError(
            f"--dtype {dtype} runs the model under CUDA autocast and is not supported on {device.type}; "
            "use --dtype fp32 there, or sample on a GPU."
        )


def _check_architecture(config: DiTConfig, model_name: Optional[str], num_classes: Optional[int]) -> None:
    """`--model` / `--num-classes` are accepted for DiT's command line; they must describe the checkpoint."""
    found = preset_name(config)
    if model_name is not None and model_name != found:
        held = found or f"non-preset {config.depth}-block, width-{config.hidden_size}, patch-{config.patch_size}"
        fix = f"pass --model {found} or leave --model out" if found else "leave --model out"
        raise ValueError(f"--model {model_name} does not match the checkpoint, which holds a {held} model; {fix}.")
    if num_classes is not None and num_classes != config.num_classes:
        raise ValueError(
            f"--num-classes {num_classes} does not match the checkpoint's {config.num_classes} classes; "
            "leave --num-classes out."
        )


def resolve_objective(ckpt: str | Path, config: DiTConfig, rf: Optional[bool]) -> tuple[str, str]:
    """(objective, where it came from) for sampling: the checkpoint's recorded objective, or
    --rf for files without a config. Stops when --rf contradicts what the checkpoint records.

    `config` is what `load_model` built: its objective is the recorded one, or "iddpm" for a
    file without a config, so the file is re-read only when --rf asks for flow on an "iddpm" config.
    """
    if rf is None:
        if config.objective == "flow":
            return "flow", "the checkpoint's config"
        return "iddpm", "the checkpoint's config, or the IDDPM default for a file without one"
    wanted = "flow" if rf else "iddpm"
    if wanted == config.objective:
        return wanted, f"--rf {rf}"
    # only a recorded config says "flow"; an "iddpm" one may be the default of a file without a config
    recorded = config.objective == "flow" or read_checkpoint(ckpt)[0] is not None
    if not recorded:
        return wanted, f"--rf {rf}"
    trained = "rectified flow" if config.objective == "flow" else "IDDPM (DDPM loss)"
    asked = "rectified-flow (Euler/Heun)" if rf else "IDDPM (DDPM/DDIM)"
    raise ValueError(
        f"The checkpoint records that it was trained with {trained} but --rf {rf} asks for {asked} sampling, "
        f"which gives noise or NaNs for it; leave --rf out or pass --rf {config.objective == 'flow'}."
    )


def _check_sampler(objective: Objective, sampler: Optional[str], source: str, rf: Optional[bool]) -> None:
    if sampler is None or sampler in objective.samplers:
        return
    hint = ""
    if rf is None and objective.samplers[0] == "ddpm":  # maybe a flow model in a file without a config
        hint = "; if the file has no config and was trained with rectified flow, pass --rf True"
    raise ValueError(
        f"--sampler {sampler} cannot sample {objective.description} (objective from {source}); "
        f"use --sampler {' or '.join(objective.samplers)}{hint}."
    )


def resolve_codec(vae_path: Optional[str], config: DiTConfig) -> nn.Module:
    """The codec that turns the model's outputs into images: the VAE at `vae_path`, or pixels
    for "none" and for a 1/3-channel model when no path is given."""
    latent = config.in_channels not in IMAGE_CHANNELS
    if latent and (vae_path is None or is_pixel_space(vae_path)):
        given = "--vae-path none samples pixels" if vae_path is not None else "no --vae-path was given"
        raise ValueError(
            f"This checkpoint generates {config.in_channels}-channel latents but {given}; pass --vae-path DIR "
            "with the diffusers AutoencoderKL it was trained with (e.g. a local copy of stabilityai/sd-vae-ft-mse)."
        )
    codec = load_codec(PIXEL_SPACE if vae_path is None else vae_path, channels=config.in_channels)
    check_codec(config, codec)
    return codec


def _check_image_size(image_size: Optional[int], config: DiTConfig, codec: nn.Module) -> int:
    produced = config.input_size * codec.downsample
    if image_size is not None and image_size != produced:
        what = (
            f"{config.input_size}x{config.input_size} latents, which the VAE decodes to {produced}x{produced} pixels"
            if codec.downsample > 1 else f"{produced}x{produced} images"
        )
        raise ValueError(
            f"--image-size {image_size} does not fit this checkpoint: it generates {what}; "
            f"pass --image-size {produced} or leave it out."
        )
    return produced


def sample_grid(
    ckpt: str | Path,
    out: str | Path = "sample.png",
    *,
    vae_path: Optional[str] = None,
    class_labels: Optional[Sequence[int]] = None,
    options: Optional[SamplingOptions] = None,
    rf: Optional[bool] = None,
    seed: int = 0,
    num_experts_per_tok: Optional[int] = None,
    image_size: Optional[int] = None,
    model_name: Optional[str] = None,
    num_classes: Optional[int] = None,
    dtype: str = "fp32",
    device: Optional[str] = None,
    progress: bool = False,
    nrow: int = GRID_NROW,
    scale: int = 1,
) -> SampleGrid:
    """Sample one image per class label (default: `default_labels`) from `ckpt` and write them as a PNG grid.

    `options` default to `SamplingOptions(cfg_scale=1.5)`; their sampler and step count default
    to the objective's (IDDPM: ddpm, 250 steps; flow: euler, 50). Bad input (missing file,
    wrong --model/--image-size/--rf, latent model without a VAE, ...) raises ValueError or
    FileNotFoundError with one sentence that says how to fix it, before any sampling.
    """
    options = options or SamplingOptions(cfg_scale=DEFAULT_CFG_SCALE)
    if nrow < 1 or scale < 1:
        raise ValueError(f"--nrow and --scale must be at least 1, got {nrow} and {scale}.")
    if options.num_steps is not None and options.num_steps < 1:
        raise ValueError(f"--num-sampling-steps must be at least 1, got {options.num_steps}.")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype} is unknown; use one of {', '.join(sorted(DTYPES))}.")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    _check_device(device, dtype)
    if vae_path is not None and not is_pixel_space(vae_path):
        check_vae_path(vae_path)  # before the (large) checkpoint is read

    model = load_model(ckpt, num_experts_per_tok=num_experts_per_tok, device=device)
    config = model.config
    _check_architecture(config, model_name, num_classes)
    objective_name, source = resolve_objective(ckpt, config, rf)
    if objective_name == "flow" and (options.noise_schedule, options.diffusion_steps) != ("linear", 1000):
        raise ValueError(
            "--noise-schedule and --diffusion-steps describe IDDPM models; leave them out for a rectified-flow model."
        )
    objective = build_sampling_objective(config.replace(objective=objective_name), options)
    _check_sampler(objective, options.sampler, source, rf)
    codec = resolve_codec(vae_path, config).to(device)
    _check_image_size(image_size, config, codec)
    labels = list(class_labels) if class_labels is not None else default_labels(config.num_classes)
    bad = [label for label in labels if not 0 <= label < config.num_classes]
    if bad:
        raise ValueError(
            f"Class labels {bad} are outside this model's 0..{config.num_classes - 1}; pick --class-labels in that range."
        )

    images = sample_images(
        model, codec, labels, [seed + i for i in range(len(labels))], options,
        device=device, dtype=DTYPES[dtype], progress=progress, objective=objective,
    )
    path = save_grid(images, out, nrow=nrow, scale=scale)
    sampler = options.sampler or objective.samplers[0]
    return SampleGrid(path, images, labels, objective_name, sampler, options.num_steps or objective.default_num_steps)


def _flag(name: str) -> tuple[str, ...]:
    """Both spellings of a flag, `--cfg-scale` and `--cfg_scale` (one for a single word)."""
    return tuple(dict.fromkeys((f"--{name}", f"--{name.replace('-', '_')}")))


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Sample a PNG grid of chosen classes from any supported DiT / DiT-MoE checkpoint.",
        allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(*_flag("ckpt"), required=True,
                        help="official DiT .pt, feizc/DiT-MoE .pt, dit-moe export or DeepSpeed checkpoint directory")
    parser.add_argument(*_flag("out"), default="sample.png", help="PNG grid to write (default: sample.png)")
    parser.add_argument(*_flag("vae-path"), default=None,
                        help="diffusers AutoencoderKL folder, or 'none' for pixel space "
                             "(default: none for 1/3-channel models)")
    parser.add_argument("--vae", dest="vae_path", type=dit_vae_flag, default=argparse.SUPPRESS,
                        help="DiT's flag: 'none' or a local AutoencoderKL folder (ema/mse would download: use --vae-path)")
    parser.add_argument(*_flag("model"), choices=sorted(DiT_models), metavar="NAME", default=None,
                        help="for DiT's command line: must match the checkpoint's architecture when given")
    parser.add_argument(*_flag("image-size"), type=int, default=None, help="pixels; checked against the checkpoint and VAE")
    parser.add_argument(*_flag("num-classes"), type=int, default=None, help="checked against the checkpoint when given")
    parser.add_argument(*_flag("class-labels"), type=parse_labels, default=None,
                        help="e.g. 207,360,387 (default: DiT's eight for ImageNet models, else 0, 1, ... cycled)")
    parser.add_argument(*_flag("rf"), type=parse_bool, nargs="?", const=True, default=None,
                        help="True: rectified-flow model; must agree with a checkpoint that records its objective")
    parser.add_argument(*_flag("sampler"), choices=["ddpm", "ddim", "euler", "heun"], default=None,
                        help="default: ddpm (IDDPM models), euler (flow models)")
    parser.add_argument(*_flag("num-sampling-steps"), type=int, default=None, help="default: 250 (IDDPM), 50 (flow)")
    parser.add_argument(*_flag("cfg-scale"), type=float, default=DEFAULT_CFG_SCALE,
                        help="classifier-free guidance; 1 disables it (default 1.5 as DiT-MoE; DiT uses 4.0)")
    parser.add_argument(*_flag("cfg-channels"), type=int, default=None,
                        help="guided prediction channels (default all; 3 = DiT's forward_with_cfg)")
    parser.add_argument(*_flag("noise-schedule"), choices=["linear", "cosine"], default="linear",
                        help="IDDPM models only: the beta schedule they were trained with")
    parser.add_argument(*_flag("diffusion-steps"), type=int, default=1000, help="IDDPM models only: training steps")
    parser.add_argument(*_flag("num-experts-per-tok"), type=int, default=None,
                        help="top-k override (feizc/DiT-MoE files do not record it; default 2)")
    parser.add_argument(*_flag("seed"), type=int, default=0, help="image i uses seed + i")
    parser.add_argument(*_flag("nrow"), type=int, default=GRID_NROW, help=f"images per grid row (default {GRID_NROW}, as DiT)")
    parser.add_argument(*_flag("scale"), type=int, default=1,
                        help="enlarge each image this many times by pixel repetition (for tiny images)")
    parser.add_argument(*_flag("dtype"), choices=sorted(DTYPES), default="fp32", help="bf16/fp16: CUDA autocast only")
    parser.add_argument(*_flag("device"), default=None, help="default: cuda when a GPU is present, else cpu")
    return parser


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    """Parse the command line, sample, print where the grid went; bad input exits 2 with one sentence."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    try:
        options = SamplingOptions(
            sampler=args.sampler, num_steps=args.num_sampling_steps, cfg_scale=args.cfg_scale,
            cfg_channels=args.cfg_channels, noise_schedule=args.noise_schedule, diffusion_steps=args.diffusion_steps,
        )
        grid = sample_grid(
            args.ckpt, args.out, vae_path=args.vae_path, class_labels=args.class_labels, options=options, rf=args.rf,
            seed=args.seed, num_experts_per_tok=args.num_experts_per_tok, image_size=args.image_size,
            model_name=args.model, num_classes=args.num_classes, dtype=args.dtype, device=args.device, progress=True,
            nrow=args.nrow, scale=args.scale,
        )
    except (FileNotFoundError, ValueError) as err:  # bad checkpoint, VAE, flags: one sentence, no traceback
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    print(
        f"Saved {len(grid.labels)} samples (classes {','.join(map(str, grid.labels))}; {grid.objective}, "
        f"{grid.sampler}, {grid.num_steps} steps, cfg {options.cfg_scale}) to {grid.path}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(prog="python -m dit_moe.sample_grid"))
