"""Sample from a checkpoint with the routing recorder attached, and the one-call analysis.

    path = collect_routing("model.pt", "routing.npz", classes=[0, 1, 2], samples_per_class=8)
    paths = analyse_checkpoint("model.pt", "routing_out/")   # routing file, heatmaps, summary

Loading, the objective and every check are the sampling prepare step's
(dit_moe.sampling.prepare), and sampling is `sample_images`, as for `sample.py`, so the
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

from tqdm.auto import tqdm

from ..sampling import PreparedSampler, SamplingOptions, SamplingRequest, prepare_sampling
from ..utils.atomic import write_text
from ..utils.errors import UserError
from .plots import class_heatmap, patch_dominant_heatmap, patch_expert_heatmap, save_figure, step_heatmap
from .recorder import RoutingRecorder
from .stats import format_summary, load_counts, summarize


def default_classes(num_classes: int, count: int = 10) -> list[int]:
    """Up to `count` evenly spaced classes: all of 10 classes, every 100th of ImageNet's 1000."""
    return list(range(0, num_classes, max(1, num_classes // count)))[:count]


def collect_routing(
    ckpt: str | os.PathLike,
    out: str | os.PathLike,
    vae_path: Optional[str] = None,
    classes: Optional[Sequence[int]] = None,
    samples_per_class: int = 2,
    num_steps: Optional[int] = None,
    sampler: Optional[str] = None,
    cfg_scale: Optional[float] = None,
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
    the objective's (IDDPM: ddpm, 250; flow: euler, 50). Returns the routing file's path. Malloc is left
    as it is; a caller that owns its process can pass `record_routing` a request with
    `keep_freed_host_memory=True` for the CPU setting the command line uses (see dit_moe.sampling.prepare).
    """
    options = SamplingOptions(sampler=sampler, num_steps=num_steps, cfg_scale=cfg_scale)
    request = SamplingRequest(ckpt, vae_path=vae_path, options=options, dtype=dtype, device=device)
    return record_routing(
        request, out, classes, samples_per_class, seed, batch_size, record_uncond, max_memory_mb, progress
    )


def record_routing(
    request: SamplingRequest,
    out: str | os.PathLike,
    classes: Optional[Sequence[int]] = None,
    samples_per_class: int = 2,
    seed: int = 0,
    batch_size: int = 32,
    record_uncond: bool = False,
    max_memory_mb: float = 256.0,
    progress: bool = True,
) -> Path:
    """`collect_routing` for a sampling request (what `python -m dit_moe.routing collect` parses)."""
    if samples_per_class < 1 or batch_size < 1:
        raise UserError(f"samples_per_class and batch_size must be positive, got {samples_per_class} and {batch_size}.")
    prepared = prepare_sampling(request)
    if not prepared.model.moe_blocks:
        raise UserError(f"{request.ckpt} is a dense DiT (no MoE layers), so it has no routing to analyse.")
    num_classes = prepared.config.num_classes
    classes = prepared.check_labels(default_classes(num_classes) if classes is None else classes, "--classes")
    labels = [c for c in classes for _ in range(samples_per_class)]
    recorder = RoutingRecorder(prepared.model, record_uncond=record_uncond, max_memory_mb=max_memory_mb)
    try:
        with recorder:
            _sample_recorded(prepared, recorder, labels, seed, batch_size, progress)
        return recorder.save(
            out,
            ckpt=str(Path(request.ckpt).resolve()),
            vae_path=prepared.vae_path,
            classes=classes,
            samples_per_class=samples_per_class,
            seed=seed,
            objective=prepared.objective_name,
            sampling=dict(
                asdict(prepared.options), sampler=prepared.sampler, num_steps=prepared.num_steps, dtype=request.dtype
            ),
        )
    finally:
        recorder.close()


def _sample_recorded(
    prepared: PreparedSampler, recorder: RoutingRecorder, labels: list[int], seed: int, batch_size: int, progress: bool
) -> None:
    """Sample `labels` (sample i with seed `seed + i`) in batches, tagging each step's forwards for `recorder`."""
    batches = [range(i, min(i + batch_size, len(labels))) for i in range(0, len(labels), batch_size)]
    bar = tqdm(total=len(batches) * prepared.num_steps, desc="routing", unit="step", disable=not progress)

    def tag_step(info: dict) -> None:
        """Sampler callback: tag the forwards of this step, advance the bar."""
        recorder.set_context(timestep=info["t"], step=info["step"])
        bar.update(1)

    with bar:
        for batch in batches:
            prepared.sample([labels[i] for i in batch], [seed + i for i in batch], callback=tag_step)


def write_summary(routing: str | os.PathLike, json_path: Optional[str | os.PathLike] = None) -> tuple[dict, str]:
    """Summary statistics of a routing file as (dict, text); also written as JSON to `json_path` when given."""
    summary = summarize(load_counts(routing))
    if json_path is not None:
        write_text(json_path, json.dumps(summary, indent=2))
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
    paths["summary_json"] = write_text(out_dir / "routing_summary.json", json.dumps(summary, indent=2))
    paths["summary_txt"] = write_text(out_dir / "routing_summary.txt", format_summary(summary) + "\n")
    return paths


def analyse_checkpoint(
    ckpt: str | os.PathLike,
    out_dir: str | os.PathLike,
    vae_path: Optional[str] = None,
    classes: Optional[Sequence[int]] = None,
    samples_per_class: int = 2,
    num_steps: Optional[int] = 20,
    sampler: Optional[str] = None,
    cfg_scale: Optional[float] = None,
    seed: int = 0,
    device: Optional[str] = None,
    progress: bool = True,
) -> dict[str, Path]:
    """Record routing while sampling from `ckpt`, then write heatmaps and summary into `out_dir`.

    Returns paths by name: "routing" (routing.npz), "class", "patch", "patch_experts", "step"
    (PNGs), "summary_json", "summary_txt".
    """
    options = SamplingOptions(sampler=sampler, num_steps=num_steps, cfg_scale=cfg_scale)
    request = SamplingRequest(ckpt, vae_path=vae_path, options=options, device=device)
    return analyse_request(
        request, out_dir, classes=classes, samples_per_class=samples_per_class, seed=seed, progress=progress
    )


def analyse_request(request: SamplingRequest, out_dir: str | os.PathLike, **recording) -> dict[str, Path]:
    """`analyse_checkpoint` for a sampling request (what `python -m dit_moe.routing all` parses);
    `recording` takes `record_routing`'s options (classes, samples_per_class, seed, batch_size, ...)."""
    routing = record_routing(request, Path(out_dir) / "routing.npz", **recording)
    return {"routing": routing, **plot_routing(routing, out_dir)}
