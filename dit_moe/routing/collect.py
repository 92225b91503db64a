"""Sample from a checkpoint with the routing recorder attached, and the one-call analysis.

    path = collect_routing("model.pt", "routing.npz", classes=[0, 1, 2], samples_per_class=8)
    paths = analyse_checkpoint("model.pt", "routing_out/")   # routing file, heatmaps, summary

Sampling goes through `dit_moe.sampling.sample_images`, the path `sample.py` uses, so the
routing is that of real samples: sample i has seed `seed + i`; each forward is tagged
with the timestep the sampler's per-step callback announces (IDDPM: original-process
index; flow: t in (0, 1]) and its step index (Heun's second evaluation of a step carries
the step's tags too). With guidance, only the conditional half is recorded unless
`record_uncond`.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Sequence

import torch
from tqdm.auto import tqdm

from ..checkpoint import load_model
from ..sampling import SamplingOptions, build_sampling_objective, check_codec, sample_images
from ..vae import PIXEL_SPACE, load_codec
from .plots import class_heatmap, patch_dominant_heatmap, patch_expert_heatmap, save_figure, step_heatmap
from .recorder import RoutingRecorder
from .stats import format_summary, load_counts, summarize

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def default_classes(num_classes: int, count: int = 10) -> list[int]:
    """Up to `count` evenly spaced classes: all of 10 classes, every 100th of ImageNet's 1000."""
    return list(range(0, num_classes, max(1, num_classes // count)))[:count]


def collect_routing(
    ckpt: str | os.PathLike,
    out: str | os.PathLike,
    vae_path: str = PIXEL_SPACE,
    classes: Optional[Sequence[int]] = None,
    samples_per_class: int = 2,
    num_steps: Optional[int] = None,
    sampler: Optional[str] = None,
    cfg_scale: float = 1.5,
    seed: int = 0,
    batch_size: int = 32,
    record_uncond: bool = False,
    device: Optional[str] = None,
    dtype: str = "fp32",
    max_memory_mb: float = 256.0,
    progress: bool = True,
) -> Path:
    """Sample `samples_per_class` images of each class from `ckpt` and write the routing of every token to `out`.

    `classes` defaults to `default_classes(num_classes)`; `num_steps` and `sampler` default to
    the objective's (IDDPM: ddpm, 250; flow: euler, 50). Returns the routing file's path.
    """
    if samples_per_class < 1 or batch_size < 1:
        raise ValueError(f"samples_per_class and batch_size must be positive, got {samples_per_class} and {batch_size}.")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}.")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load_model(ckpt, device=device)
    config = model.config
    if not model.moe_blocks:
        raise ValueError(f"{ckpt} is a dense DiT (no MoE layers), so it has no routing to analyse.")
    classes = default_classes(config.num_classes) if classes is None else [int(c) for c in classes]
    bad = [c for c in classes if not 0 <= c < config.num_classes]
    if bad or not classes:
        raise ValueError(
            f"Classes {bad or classes} are not valid for a {config.num_classes}-class model; "
            f"pick from 0..{config.num_classes - 1}."
        )
    codec = load_codec(vae_path, channels=config.in_channels).to(device)
    check_codec(config, codec)
    options = SamplingOptions(sampler=sampler, num_steps=num_steps, cfg_scale=cfg_scale)
    objective = build_sampling_objective(config, options)
    sampler = sampler or objective.samplers[0]
    if sampler not in objective.samplers:
        raise ValueError(f"Sampler {sampler} cannot sample {objective.description}; use {' or '.join(objective.samplers)}.")
    labels = [c for c in classes for _ in range(samples_per_class)]
    batches = [range(i, min(i + batch_size, len(labels))) for i in range(0, len(labels), batch_size)]
    bar = tqdm(total=0, desc="routing", unit="step", disable=not progress)
    recorder = RoutingRecorder(model, record_uncond=record_uncond, max_memory_mb=max_memory_mb)

    def tag_step(info: dict) -> None:
        """Sampler callback: tag the forwards of this step, advance the bar."""
        if bar.total == 0:
            bar.total = len(batches) * info["num_steps"]
            bar.refresh()
        recorder.set_context(timestep=info["t"], step=info["step"])
        bar.update(1)

    try:
        with recorder:
            for batch in batches:
                sample_images(model, codec, [labels[i] for i in batch], [seed + i for i in batch], options,
                              device=device, dtype=DTYPES[dtype], objective=objective, callback=tag_step)
        steps = options.num_steps or objective.default_num_steps
        return recorder.save(
            out, ckpt=str(Path(ckpt).resolve()), vae_path=str(vae_path), classes=classes,
            samples_per_class=samples_per_class, seed=seed, objective=config.objective,
            sampling=dict(asdict(options), sampler=sampler, num_steps=steps, dtype=dtype),
        )
    finally:
        bar.close()
        recorder.close()


def write_summary(routing: str | os.PathLike, json_path: Optional[str | os.PathLike] = None) -> tuple[dict, str]:
    """Summary statistics of a routing file as (dict, text); also written as JSON to `json_path` when given."""
    summary = summarize(load_counts(routing))
    if json_path is not None:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(summary, indent=2))
    return summary, format_summary(summary)


def plot_routing(routing: str | os.PathLike, out_dir: str | os.PathLike, bins: int = 10) -> dict[str, Path]:
    """All heatmaps and the summary of a routing file, written into `out_dir`; returns their paths by name."""
    out_dir = Path(out_dir)
    counts = load_counts(routing)
    paths = {
        "class": save_figure(class_heatmap(counts), out_dir / "heatmap_class.png"),
        "patch": save_figure(patch_dominant_heatmap(counts), out_dir / "heatmap_patch.png"),
        "patch_experts": save_figure(patch_expert_heatmap(counts), out_dir / "heatmap_patch_experts.png"),
        "step": save_figure(step_heatmap(counts, bins=bins), out_dir / "heatmap_step.png"),
    }
    summary = summarize(counts)
    paths["summary_json"] = out_dir / "routing_summary.json"
    paths["summary_json"].write_text(json.dumps(summary, indent=2))
    paths["summary_txt"] = out_dir / "routing_summary.txt"
    paths["summary_txt"].write_text(format_summary(summary) + "\n")
    return paths


def analyse_checkpoint(
    ckpt: str | os.PathLike,
    out_dir: str | os.PathLike,
    vae_path: str = PIXEL_SPACE,
    classes: Optional[Sequence[int]] = None,
    samples_per_class: int = 2,
    num_steps: Optional[int] = 20,
    sampler: Optional[str] = None,
    cfg_scale: float = 1.5,
    seed: int = 0,
    device: Optional[str] = None,
    progress: bool = True,
) -> dict[str, Path]:
    """Record routing while sampling from `ckpt`, then write heatmaps and summary into `out_dir`.

    Returns paths by name: "routing" (routing.npz), "class", "patch", "patch_experts", "step"
    (PNGs), "summary_json", "summary_txt".
    """
    out_dir = Path(out_dir)
    routing = collect_routing(
        ckpt, out_dir / "routing.npz", vae_path=vae_path, classes=classes, samples_per_class=samples_per_class,
        num_steps=num_steps, sampler=sampler, cfg_scale=cfg_scale, seed=seed, device=device, progress=progress,
    )
    return {"routing": routing, **plot_routing(routing, out_dir)}
