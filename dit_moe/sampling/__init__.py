"""How an image is made, and the tools that make them.

    prepared = prepare_sampling(SamplingRequest(ckpt, options=SamplingOptions(cfg_scale=1.5)))
    images = prepared.sample(labels, seeds)           # (N, C, H, W) in [-1, 1]

Files: images.py (`sample_images`: per-sample seeded noise -> guided sampler -> decode),
prepare.py (the one front door: load once, objective, codec, every check), flags.py (the
flags every sampling tool shares), grid.py (PNG grid, `sample.py`), many.py (sharded FID
batches, `python -m dit_moe.sampling.many`). The routing collector (dit_moe.routing.collect)
starts from the same prepare step.
"""

from .images import (
    LABEL_MODES,
    SampleRun,
    SamplingOptions,
    SamplingStats,
    StackedRandomGenerator,
    build_sampling_objective,
    check_codec,
    latent_shape,
    per_sample_noise,
    sample_images,
    sample_labels,
)
from .prepare import PreparedSampler, SamplingRequest, prepare_sampling, resolve_objective

__all__ = [
    "LABEL_MODES",
    "SampleRun",
    "SamplingOptions",
    "SamplingStats",
    "StackedRandomGenerator",
    "build_sampling_objective",
    "check_codec",
    "latent_shape",
    "per_sample_noise",
    "sample_images",
    "sample_labels",
    "PreparedSampler",
    "SamplingRequest",
    "prepare_sampling",
    "resolve_objective",
]
