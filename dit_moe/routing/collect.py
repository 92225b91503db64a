"""Sample from a checkpoint with the routing recorder attached, and the one-call analysis.

    request = RoutingRequest.for_checkpoint("model.pt", classes=[0, 1, 2], samples_per_class=8)
    path = collect_routing(request, "routing.npz")
    paths = analyse_routing(request, "routing_out/")   # routing file, heatmaps, summary

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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from tqdm.auto import tqdm

from ..sampling import PreparedSampler, SamplingRequest, prepare_sampling
from ..utils.atomic import write_text
from ..utils.errors import UserError
from .plots import class_heatmap, patch_dominant_heatmap, patch_expert_heatmap, save_figure, step_heatmap
from .recorder import RoutingRecorder
from .stats import format_summary, load_counts, summarize


def default_classes(num_classes: int, count: int = 10) -> list[int]:
    """Up to `count` evenly spaced classes: all of 10 classes, every 100th of ImageNet's 1000."""
    return list(range(0, num_classes, max(1, num_classes // count)))[:count]


@dataclass(frozen=True)
class RoutingRequest:
    """One routing collection: what to sample (a SamplingRequest: checkpoint, codec, sampler, steps,
    guidance, device) and which samples to record."""

    sampling: SamplingRequest
    classes: Optional[Sequence[int]] = None  # None: default_classes(num_classes)
    samples_per_class: int = 2
    seed: int = 0  # sample i has seed `seed + i`
    batch_size: int = 32
    record_uncond: bool = False  # with guidance, also record the unconditional half
    max_memory_mb: float = 256.0  # the recorder's buffer before it spills rows to disk
    progress: bool = True

    def __post_init__(self) -> None:
        if self.samples_per_class < 1 or self.batch_size < 1:
            raise UserError(
                f"samples_per_class and batch_size must be positive, got {self.samples_per_class} and "
                f"{self.batch_size}."
            )

    @classmethod
    def for_checkpoint(cls, ckpt: str | os.PathLike, **fields: Any) -> "RoutingRequest":
        """A request for `ckpt` with the sampling prepare step's defaults (vae from the file, the
        objective's sampler and steps, fp32 on the default device)."""
        return cls(SamplingRequest(ckpt), **fields)


def collect_routing(request: RoutingRequest, out: str | os.PathLike) -> Path:
    """Sample `samples_per_class` images of each class and write the routing of every token to `out`
    (what `python -m dit_moe.routing collect` does); returns the routing file's path. Malloc is left as
    it is: a caller that owns its process may set `keep_freed_host_memory=True` on the SamplingRequest
    for the CPU setting the command line uses (see dit_moe.sampling.prepare)."""
    prepared = prepare_sampling(request.sampling)
    if not prepared.model.moe_blocks:
        raise UserError(f"{request.sampling.ckpt} is a dense DiT (no MoE layers), so it has no routing to analyse.")
    num_classes = prepared.config.num_classes
    wanted = default_classes(num_classes) if request.classes is None else request.classes
    classes = prepared.check_labels(wanted, "--classes")
    labels = [c for c in classes for _ in range(request.samples_per_class)]
    recorder = RoutingRecorder(prepared.model, record_uncond=request.record_uncond, max_memory_mb=request.max_memory_mb)
    try:
        with recorder:
            _sample_recorded(prepared, recorder, labels, request)
        return recorder.save(out, **_provenance(request, prepared, classes))
    finally:
        recorder.close()


def _provenance(request: RoutingRequest, prepared: PreparedSampler, classes: list[int]) -> dict[str, Any]:
    """What the routing file records about how its samples were drawn."""
    sampling = dict(
        asdict(prepared.options),
        sampler=prepared.sampler,
        num_steps=prepared.num_steps,
        dtype=request.sampling.dtype,
    )
    return dict(
        ckpt=str(Path(request.sampling.ckpt).resolve()),
        vae_path=prepared.vae_path,
        classes=classes,
        samples_per_class=request.samples_per_class,
        seed=request.seed,
        objective=prepared.objective_name,
        sampling=sampling,
        cost=prepared.stats.describe(),  # model evaluations (and FLOPs) per image, as sample.py prints them
    )


def _sample_recorded(
    prepared: PreparedSampler, recorder: RoutingRecorder, labels: list[int], request: RoutingRequest
) -> None:
    """Sample `labels` (sample i with seed `seed + i`) in batches, tagging each step's forwards for `recorder`."""
    seed, batch_size, progress = request.seed, request.batch_size, request.progress
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


def analyse_routing(request: RoutingRequest, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Record routing while sampling, then write heatmaps and summary into `out_dir` (what
    `python -m dit_moe.routing all` does).

    Returns paths by name: "routing" (routing.npz), "class", "patch", "patch_experts", "step"
    (PNGs), "summary_json", "summary_txt".
    """
    routing = collect_routing(request, Path(out_dir) / "routing.npz")
    return {"routing": routing, **plot_routing(routing, out_dir)}
