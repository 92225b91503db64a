"""How an image is made: noise from per-sample seeds, the objective's sampler under guidance, the codec's decode.

    objective = build_sampling_objective(model.config, ObjectiveConfig(objective="flow"))
    images = sample_images(model, codec, labels, seeds, SamplingOptions(sampler="euler", cfg_scale=1.5),
                           objective=objective)

Every sampling tool (the PNG grid behind `sample.py`, the FID sampler `dit_moe.sampling.many`,
the routing collector) calls `sample_images` through the prepare step (prepare.py).

Reproducibility (EDM's `StackedRandomGenerator`): every sample owns a CPU generator seeded
with its seed, which draws its initial noise and then, for the stochastic samplers (DDPM,
DDIM with eta > 0), its noise at every step. A sample's image therefore depends on its
seed, label and settings alone, never on the batch it shares, the rank that draws it or
the device, for every sampler: the same for any world size and batch size, up to
floating-point differences of batched kernels.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..diffusion import Objective, ObjectiveConfig, build_objective, guided
from ..models import DiT, DiTConfig

LABEL_MODES = ("cycle", "random")
_LABEL_STREAM = 1  # keeps label draws apart from the noise stream of the same seed


@dataclass
class SamplingOptions:
    """How to turn noise into images; None picks the objective's default."""

    sampler: Optional[str] = None  # "ddpm" | "ddim" (IDDPM models), "euler" | "heun" (flow models)
    num_steps: Optional[int] = None  # IDDPM: respaced steps (250); flow: uniform steps (50)
    # Classifier-free guidance scale; 1 = no guidance (one forward per step). None: the prepare step's
    # default for the checkpoint (prepare.default_cfg_scale); sample_images alone treats None as 1.
    cfg_scale: Optional[float] = None
    cfg_channels: Optional[int] = None  # guided prediction channels; None = all, 3 = DiT's forward_with_cfg

    def __post_init__(self):
        if self.cfg_scale is not None and self.cfg_scale < 1.0:
            raise ValueError(f"cfg_scale must be >= 1 (1 disables guidance), got {self.cfg_scale}.")


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


@torch.no_grad()
def sample_images(
    model: DiT,
    codec: nn.Module,
    labels: Sequence[int] | torch.Tensor,
    seeds: Sequence[int],
    options: Optional[SamplingOptions] = None,
    *,
    objective: Objective,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
    callback: Optional[Callable[[dict], None]] = None,
) -> torch.Tensor:
    """Images (N, C, H, W), float32 in [-1, 1] on the CPU, for one label and one seed per sample.

    `model` and `codec` must already be on `device`. `dtype` other than float32 runs the model
    (not the sampler's arithmetic) under autocast. `objective` is the one the model was trained
    with (`build_sampling_objective`; the prepare step resolves it from the checkpoint).
    `callback` is handed to the sampler, which calls it at the start of every step (see
    dit_moe.diffusion.samplers); the routing recorder tags forwards with it.
    """
    config = model.config
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    if len(labels) != len(seeds):
        raise ValueError(f"{len(labels)} labels for {len(seeds)} seeds; pass one of each per sample.")
    check_codec(config, codec)
    device = torch.device(device)
    options = options or SamplingOptions()
    cfg_scale = 1.0 if options.cfg_scale is None else options.cfg_scale
    model_fn = guided(model, cfg_scale, null_label=config.num_classes, cfg_channels=options.cfg_channels)
    rng = StackedRandomGenerator(seeds)
    noise = rng.randn(latent_shape(config), device=device)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    with autocast:
        latents = objective.sample(
            model_fn,
            noise,
            dict(y=labels.to(device)),
            sampler=options.sampler,
            num_steps=options.num_steps,
            progress=progress,
            callback=callback,
            noise_fn=rng.randn_like,
        )
        images = codec.decode(latents.float())
    return images.float().clamp(-1, 1).cpu()
