"""How an image is made: noise from per-sample seeds, the objective's sampler under guidance, the codec's decode.

    objective = build_sampling_objective(model.config, ObjectiveConfig(objective="flow"))
    images = sample_images(model, codec, labels, seeds, SamplingOptions(sampler="euler", cfg_scale=1.5),
                           objective=objective)

Every sampling tool (the PNG grid behind `sample.py`, the FID sampler `dit_moe.sampling.many`,
the routing collector) calls `sample_images` through the prepare step (prepare.py).

Reproducibility (EDM's `StackedRandomGenerator`): every sample owns a CPU generator seeded
with its seed, which draws its initial noise and then, for the stochastic samplers (DDPM,
DDIM with eta > 0, dpm++2m-sde), its noise at every step. A sample's image therefore depends on its
seed, label and settings alone, never on the batch it shares, the rank that draws it or
the device, for every sampler: the same for any world size and batch size, up to
floating-point differences of batched kernels.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..diffusion import Objective, ObjectiveConfig, build_objective, guided
from ..diffusion.guidance import EvaluationCounter, interval
from ..models import DiT, DiTConfig
from ..models.flops import forward_flops
from .step_cache import CacheSpec, ExpertCache

LABEL_MODES = ("cycle", "random")
_LABEL_STREAM = 1  # keeps label draws apart from the noise stream of the same seed


@dataclass
class SamplingOptions:
    """How to turn noise into images; None picks the objective's default."""

    # "ddpm" | "ddim" (IDDPM models), "euler" | "heun" (flow models), "dpm++2m" | "dpm++3m" | "dpm++2m-sde" | "unipc" | "deis" (both)
    sampler: Optional[str] = None
    num_steps: Optional[int] = None  # IDDPM: respaced steps (250); flow: uniform steps (50); solvers: 25 / 10
    # Classifier-free guidance scale; 1 = no guidance (one forward per step). None: the prepare step's
    # default for the checkpoint (prepare.default_cfg_scale); sample_images alone treats None as 1.
    cfg_scale: Optional[float] = None
    cfg_channels: Optional[int] = None  # guided prediction channels; None = all, 3 = DiT's forward_with_cfg
    # Guidance only at noise levels sigma in (low, high] (diffusion.guidance.interval); None: at every step.
    guidance_interval: Optional[tuple[float, float]] = None
    cache: Optional[str] = None  # step caching, "experts:N" (step_cache.py); None: none

    def __post_init__(self):
        if self.cfg_scale is not None and self.cfg_scale < 1.0:
            raise ValueError(f"cfg_scale must be >= 1 (1 disables guidance), got {self.cfg_scale}.")
        if self.guidance_interval is not None:
            low, high = (float(v) for v in self.guidance_interval)
            if not 0 <= low < high:
                raise ValueError(f"guidance_interval needs 0 <= LO < HI, got {low},{high}.")
            self.guidance_interval = (low, high)
        CacheSpec.parse(self.cache)


@dataclass
class SamplingStats:
    """What sampling cost, summed over `sample_images` calls: images, network rows (an evaluation of one
    image; guided steps forward two rows per image inside the guidance interval), matmul FLOPs."""

    images: int = 0
    rows: int = 0
    flops: int = 0  # dit_moe.models.flops accounting, after caching
    flops_saved: int = 0  # skipped by step caching

    @property
    def evaluations_per_image(self) -> float:
        return self.rows / max(1, self.images)

    def describe(self) -> str:
        """One line: evaluations per image, and FLOPs per image with what caching saved."""
        line = f"{self.evaluations_per_image:g} model evaluations per image"
        if self.images:
            line += f", {self.flops / self.images / 1e9:.4g} GFLOPs per image"
        if self.flops_saved:
            line += f" ({self.flops_saved / (self.flops + self.flops_saved):.1%} saved by caching)"
        return line


@dataclass
class SampleRun:
    """Where and how a `sample_images` call runs, and what it adds its cost to."""

    device: str | torch.device = "cpu"
    dtype: torch.dtype = torch.float32  # other than float32: the model under autocast
    progress: bool = False
    stats: SamplingStats = field(default_factory=SamplingStats)


def build_sampling_objective(config: DiTConfig, objective: ObjectiveConfig) -> Objective:
    """The objective a model was trained with, ready to sample it (IDDPM schedule or flow time scale)."""
    return build_objective(objective.objective, **objective.build_options(config.learn_sigma))


class StackedRandomGenerator:
    """One CPU generator per sample (EDM's `StackedRandomGenerator`): row i of every draw comes
    from generator i, seeded with seeds[i], so it is the same whatever else is in the batch.

    Draws happen on the CPU and are then moved, so they are also the same on every device.
    """

    def __init__(self, seeds: Sequence[int]):
        self.generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds]

    def randn(
        self, shape: Sequence[int], device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """Standard normal (N, *shape): the next draw of each sample's generator."""
        rows = [torch.randn(tuple(shape), generator=generator) for generator in self.generators]
        return torch.stack(rows).to(device=device, dtype=dtype)

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        """Standard normal shaped, placed and typed like x (N, ...); a sampler's `noise_fn`."""
        if x.shape[0] != len(self.generators):
            raise ValueError(f"Batch of {x.shape[0]} samples for {len(self.generators)} generators.")
        return self.randn(x.shape[1:], device=x.device, dtype=x.dtype)


def per_sample_noise(seeds: Sequence[int], shape: Sequence[int]) -> torch.Tensor:
    """Standard normal noise (N, *shape), float32 on the CPU; row i depends only on seeds[i].

    It is the first draw of `StackedRandomGenerator(seeds)`, i.e. the initial noise `sample_images` uses.
    """
    return StackedRandomGenerator(seeds).randn(shape)


def sample_labels(indices: Sequence[int], num_classes: int, seed: int = 0, mode: str = "cycle") -> np.ndarray:
    """Class label (N,) of each sample index: `index % num_classes` ("cycle", balanced classes) or
    a uniform draw that depends only on (seed + index) ("random", as DiT's sample_ddp.py draws them)."""
    if mode not in LABEL_MODES:
        raise ValueError(f"Unknown label mode {mode!r}; use one of {LABEL_MODES}.")
    indices = np.asarray(indices, dtype=np.int64)
    if mode == "cycle":
        return indices % num_classes
    return np.array(
        [np.random.default_rng((seed + int(i), _LABEL_STREAM)).integers(num_classes) for i in indices], dtype=np.int64
    )


def latent_shape(config: DiTConfig) -> tuple[int, int, int]:
    """(C, H, W) of the model's input."""
    return config.in_channels, config.input_size, config.input_size


def check_codec(config: DiTConfig, codec: nn.Module) -> None:
    """Stop early when the codec cannot decode what the model generates."""
    if codec.latent_channels != config.in_channels:
        raise ValueError(
            f"The model generates {config.in_channels}-channel inputs but the codec has {codec.latent_channels} channels: "
            "pass the VAE the model was trained with (--vae-path DIR), or --vae-path none for a pixel-space model."
        )


def _guided_model(model: DiT, objective: Objective, options: SamplingOptions, counter: EvaluationCounter):
    """The counted network under classifier-free guidance (and its interval) as `options` ask."""
    cfg_scale = 1.0 if options.cfg_scale is None else options.cfg_scale
    guide_at = None if options.guidance_interval is None else interval(objective.process, *options.guidance_interval)
    return guided(counter, cfg_scale, model.config.num_classes, options.cfg_channels, guide_at)


@torch.no_grad()
def sample_images(
    model: DiT,
    codec: nn.Module,
    labels: Sequence[int] | torch.Tensor,
    seeds: Sequence[int],
    options: Optional[SamplingOptions] = None,
    *,
    objective: Objective,
    run: Optional[SampleRun] = None,
    callback: Optional[Callable[[dict], None]] = None,
) -> torch.Tensor:
    """Images (N, C, H, W), float32 in [-1, 1] on the CPU, for one label and one seed per sample.

    `model` and `codec` must already be on `run.device`. `objective` is the one the model was
    trained with (`build_sampling_objective`; the prepare step resolves it from the checkpoint).
    `callback` is handed to the sampler, which calls it at the start of every step (see
    dit_moe.diffusion.samplers); the routing recorder tags forwards with it. The cost (evaluations,
    FLOPs, what caching saved) is added to `run.stats`.
    """
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    if len(labels) != len(seeds):
        raise ValueError(f"{len(labels)} labels for {len(seeds)} seeds; pass one of each per sample.")
    check_codec(model.config, codec)
    run, options = run or SampleRun(), options or SamplingOptions()
    device = torch.device(run.device)
    counter = EvaluationCounter(model)
    rng = StackedRandomGenerator(seeds)
    noise = rng.randn(latent_shape(model.config), device=device)
    autocast = torch.autocast(device.type, dtype=run.dtype) if run.dtype != torch.float32 else nullcontext()
    spec = CacheSpec.parse(options.cache)
    cache = ExpertCache(model, spec) if spec is not None else nullcontext()
    with autocast, cache:
        latents = objective.sample(
            _guided_model(model, objective, options, counter),
            noise,
            dict(y=labels.to(device)),
            sampler=options.sampler,
            num_steps=options.num_steps,
            progress=run.progress,
            callback=callback,
            noise_fn=rng.randn_like,
        )
        images = codec.decode(latents.float())
    saved = cache.flops_saved if spec is not None else 0
    _add_cost(run.stats, model.config, len(labels), counter.rows, saved)
    return images.float().clamp(-1, 1).cpu()


def _add_cost(stats: SamplingStats, config: DiTConfig, images: int, rows: int, saved: int) -> None:
    stats.images += images
    stats.rows += rows
    stats.flops += rows * sum(forward_flops(config).values()) - saved
    stats.flops_saved += saved
