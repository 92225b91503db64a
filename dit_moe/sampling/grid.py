"""Sample a PNG grid of chosen classes from any checkpoint `load_model` reads: the work behind `sample.py`.

    python sample.py --model DiT-XL/2 --ckpt FILE --vae-path DIR --image-size 256 --cfg-scale 1.5
    python sample.py --image-size 512 --seed 1             # DiT's zero-setup line: its released DiT-XL/2
    python sample.py --ckpt results/run/checkpoints --class-labels 0,1,2,3 --sampler heun --out grid.png
    python -m dit_moe.sampling.grid ...                     # the same tool

Loading, the objective and every check are the prepare step's (prepare.py); this tool adds:

- `--cfg-scale` defaults to 1.5, the value of DiT-MoE's README command (DiT's sample.py uses 4.0).
- Without `--ckpt` it does what DiT's sample.py does without one: DiT's released
  `DiT-XL-2-{256|512}x{...}.pt` for `--image-size` (default 256), `--vae mse`, `--cfg-scale 4.0`,
  fetched once into the standard caches (dit_moe.hub; flags.DIT_ZERO_SETUP).
- Image i of the grid uses seed `--seed + i`, as the FID sampler's sample i does; an image does
  not depend on how many others are in the grid.
- Without `--class-labels`: DiT's eight ImageNet classes for 1000-class models, else 0, 1, ...;
  `--num-samples N` cycles the labels (given, else DiT's eight or every class) to N images.
- The grid is DiT's `save_image(samples, nrow=4, padding=2)` layout: black 2-pixel gaps,
  [-1, 1] mapped to uint8 as DiT's sample_ddp.py does; written atomically. Images smaller than
  64 pixels are enlarged by pixel repetition to at least 64 (`--scale` sets the factor), so an
  8-pixel digits model gives a readable grid rather than a 42x32 PNG.
- Every run prints the model evaluations per image (guided steps count two inside the guidance
  interval) and the FLOPs per image, with what step caching saved.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from ..cli import flag, parse_int_list, run_main
from ..evaluation.npz import save_png, to_uint8_nhwc
from ..utils.errors import UserError
from .flags import add_sampling_flags, request_from_args
from .images import SamplingOptions
from .prepare import SamplingRequest, prepare_sampling

IMAGENET_LABELS = (207, 360, 387, 974, 88, 979, 417, 279)  # DiT's sample.py default classes
GRID_NROW = 4
GRID_PADDING = 2
MIN_DEFAULT_IMAGES, MAX_DEFAULT_IMAGES = 8, 16
READABLE_SIDE = 64  # pixels: smaller images are enlarged to at least this by default


@dataclass
class GridLayout:
    """How many images the grid holds and how they are laid out."""

    num_samples: Optional[int] = None  # None: one per class label; else the labels cycled to this many
    nrow: int = GRID_NROW
    scale: Optional[int] = None  # pixel repetition; None: enough to reach READABLE_SIDE pixels
    progress: bool = False

    def scale_for(self, side: int) -> int:
        return self.scale if self.scale is not None else max(1, math.ceil(READABLE_SIDE / side))


@dataclass
class SampleGrid:
    """What `sample_grid` produced: the PNG, the images in it and how they were drawn."""

    path: Path
    images: torch.Tensor  # (N, C, H, W) float32 in [-1, 1], CPU
    labels: list[int]
    objective: str  # "iddpm" | "flow"
    sampler: str
    num_steps: int
    cfg_scale: float
    cost: str  # model evaluations and FLOPs per image (SamplingStats.describe)


def default_labels(num_classes: int) -> list[int]:
    """DiT's eight ImageNet classes for 1000-class models; else 0, 1, ... cycled to fill whole
    grid rows (4 per row), at least 8 and at most 16 images."""
    if num_classes >= 1000:
        return list(IMAGENET_LABELS)
    count = min(MAX_DEFAULT_IMAGES, max(MIN_DEFAULT_IMAGES, GRID_NROW * math.ceil(num_classes / GRID_NROW)))
    return [i % num_classes for i in range(count)]


def _base_labels(num_classes: int, class_labels: Optional[Sequence[int]], num_samples: Optional[int]) -> list[int]:
    """The labels to cycle: those given, else every class when --num-samples is given (DiT's eight for
    ImageNet models), else `default_labels`."""
    if class_labels is not None:
        return list(class_labels)
    if num_samples is not None and num_classes < 1000:
        return list(range(num_classes))
    return default_labels(num_classes)


def image_grid(
    images: torch.Tensor | np.ndarray, nrow: int = GRID_NROW, padding: int = GRID_PADDING, scale: int = 1
) -> np.ndarray:
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
    return save_png(image_grid(images, nrow, scale=scale), path)


def sample_grid(
    ckpt: str | Path,
    out: str | Path = "sample.png",
    *,
    class_labels: Optional[Sequence[int]] = None,
    options: Optional[SamplingOptions] = None,
    rf: Optional[bool] = None,
    seed: int = 0,
    layout: Optional[GridLayout] = None,
    **request: object,
) -> SampleGrid:
    """Sample one image per class label (default: `default_labels`) from `ckpt` and write them as a PNG grid.

    `options` default to `SamplingOptions()`: guidance, sampler and step count from the prepare step's
    defaults for the checkpoint (cfg 1.5, or 7.0 for a DiT-MoE flow file; sampler and steps the
    objective's: IDDPM ddpm 250, flow euler 50). `rf` is `--rf`; `request`
    takes the other `SamplingRequest` fields (vae_path, image_size, model_name, dtype, device, ...).
    Bad input raises one sentence that says how to fix it, before any sampling (see prepare.py).
    """
    objective = None if rf is None else ("flow" if rf else "iddpm")
    request = SamplingRequest(
        ckpt, options=options or SamplingOptions(), objective=objective, objective_flag="--rf", **request
    )
    return write_grid(request, out, class_labels, seed, layout)


def write_grid(
    request: SamplingRequest,
    out: str | Path,
    class_labels: Optional[Sequence[int]] = None,
    seed: int = 0,
    layout: Optional[GridLayout] = None,
) -> SampleGrid:
    """`sample_grid` for a prepared request: image i has seed `seed + i`."""
    layout = layout or GridLayout()
    if layout.nrow < 1 or (layout.scale is not None and layout.scale < 1):
        raise UserError(f"--nrow and --scale must be at least 1, got {layout.nrow} and {layout.scale}.")
    if layout.num_samples is not None and layout.num_samples < 1:
        raise UserError(f"--num-samples must be at least 1, got {layout.num_samples}.")
    prepared = prepare_sampling(request)
    labels = prepared.check_labels(_base_labels(prepared.config.num_classes, class_labels, layout.num_samples))
    if layout.num_samples is not None:
        labels = [labels[i % len(labels)] for i in range(layout.num_samples)]
    images = prepared.sample(labels, [seed + i for i in range(len(labels))], progress=layout.progress)
    path = save_grid(images, out, nrow=layout.nrow, scale=layout.scale_for(images.shape[-1]))
    options = prepared.options
    return SampleGrid(
        path,
        images,
        labels,
        prepared.objective_name,
        prepared.sampler,
        prepared.num_steps,
        options.cfg_scale,
        prepared.stats.describe(),
    )


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Sample a PNG grid of chosen classes from any supported DiT / DiT-MoE checkpoint.",
        allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_sampling_flags(parser, zero_setup=True)
    parser.add_argument(*flag("out"), default="sample.png", help="PNG grid to write (default: sample.png)")
    parser.add_argument(
        *flag("class-labels"),
        type=parse_int_list,
        default=None,
        help="e.g. 207,360,387 (default: DiT's eight for ImageNet models, else 0, 1, ... cycled)",
    )
    parser.add_argument(
        *flag("num-samples"),
        type=int,
        default=None,
        help="images in the grid, the class labels cycled (default: one per label)",
    )
    parser.add_argument(
        *flag("nrow"), type=int, default=GRID_NROW, help=f"images per grid row (default {GRID_NROW}, as DiT)"
    )
    parser.add_argument(
        *flag("scale"),
        type=int,
        default=None,
        help=f"enlarge each image this many times by pixel repetition (default: to at least {READABLE_SIDE} px)",
    )
    return parser


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    """Parse the command line, sample, print where the grid went; bad input exits 2 with one sentence."""
    parser = build_parser(prog)
    args = parser.parse_args(argv)

    def work() -> None:
        request = request_from_args(args)
        layout = GridLayout(args.num_samples, args.nrow, args.scale, progress=True)
        grid = write_grid(request, args.out, args.class_labels, args.seed, layout)
        print(
            f"Saved {len(grid.labels)} samples (classes {','.join(map(str, grid.labels))}; {grid.objective}, "
            f"{grid.sampler}, {grid.num_steps} steps, cfg {grid.cfg_scale}; {grid.cost}) to {grid.path}"
        )

    return run_main(work, prog=parser.prog)


if __name__ == "__main__":
    sys.exit(main(prog="python -m dit_moe.sampling.grid"))
