"""Heatmaps of routing counts, the figures of DiT-MoE's analysis (Fei et al. 2024, Figs. 4-6):
class x expert, timestep x expert and patch position -> expert, one panel per MoE layer.

Every function returns a matplotlib Figure (Agg, no display needed) whose panels are its
non-colour-bar axes; `save_figure` writes it as a PNG atomically. Colour is the fraction of
a row's tokens whose top-k holds the expert (see stats.py), on one shared colour bar.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Iterable, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
import numpy as np  # noqa: E402
from matplotlib.colors import BoundaryNorm, ListedColormap  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from ..utils.atomic import atomic_path  # noqa: E402
from .stats import RoutingCounts, frequencies  # noqa: E402
from .store import RoutingFileError  # noqa: E402

MAX_COLUMNS = 6
FREQUENCY_LABEL = "fraction of tokens choosing the expert"


def _panels(num: int, ncols: int = MAX_COLUMNS, size: tuple[float, float] = (2.6, 2.6)) -> tuple[Figure, list]:
    """A figure with `num` panel axes on a grid (unused cells removed)."""
    ncols = min(ncols, num)
    nrows = math.ceil(num / ncols)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(size[0] * ncols + 1.2, size[1] * nrows + 0.8), squeeze=False, constrained_layout=True
    )
    flat = list(axes.reshape(-1))
    for ax in flat[num:]:
        fig.delaxes(ax)
    return fig, flat[:num]


def _sparse_ticks(ax, labels: list[str], axis: str = "y", max_ticks: int = 12) -> None:
    """Label at most `max_ticks` rows (or columns) evenly."""
    stride = max(1, math.ceil(len(labels) / max_ticks))
    positions = list(range(0, len(labels), stride))
    if axis == "y":
        ax.set_yticks(positions, [labels[i] for i in positions])
    else:
        ax.set_xticks(positions, [labels[i] for i in positions])


def _expert_axis(ax, num_experts: int) -> None:
    _sparse_ticks(ax, [str(e) for e in range(num_experts)], axis="x", max_ticks=16)
    ax.set_xlabel("expert")


def _row_heatmaps(
    counts: RoutingCounts,
    freq: np.ndarray,
    row_labels: list[str],
    ylabel: str,
    title: str,
    cmap: str,
    layers: Optional[Iterable[int]],
) -> Figure:
    """One [rows x experts] panel per layer with a shared colour bar."""
    slots = counts.layer_slots(layers)
    fig, axes = _panels(len(slots))
    vmax = max(float(np.nanmax(freq[slots])), 1e-9)
    for ax, slot in zip(axes, slots):
        image = ax.imshow(freq[slot], aspect="auto", cmap=cmap, vmin=0.0, vmax=vmax, interpolation="nearest")
        ax.set_title(f"MoE layer {counts.moe_layers[slot]}")
        _expert_axis(ax, counts.num_experts)
        _sparse_ticks(ax, row_labels)
        ax.set_ylabel(ylabel)
    fig.colorbar(image, ax=axes, label=FREQUENCY_LABEL, shrink=0.9)
    fig.suptitle(title)
    return fig


def class_heatmap(counts: RoutingCounts, layers: Optional[Iterable[int]] = None) -> Figure:
    """Per layer: class x expert selection frequency, over the classes that were sampled."""
    rows = np.flatnonzero(counts.tokens_by_class)
    labels = ["null" if c == counts.num_classes else str(c) for c in rows]
    freq = frequencies(counts.by_class, counts.tokens_by_class)[:, rows]
    return _row_heatmaps(counts, freq, labels, "class", "Expert selection by class", "Oranges", layers)


def timestep_bins(timesteps: np.ndarray, bins: int) -> tuple[np.ndarray, list[str]]:
    """Bin index of each distinct timestep (the first bin holds the largest, noisiest timesteps) and bin labels.

    With at most `bins` distinct timesteps each is its own bin; otherwise `bins` equal-width bins.
    """
    order = np.argsort(-timesteps)
    if len(timesteps) <= bins:
        index = np.empty(len(timesteps), np.int64)
        index[order] = np.arange(len(timesteps))
        return index, [f"{timesteps[i]:.4g}" for i in order]
    high, low = float(timesteps.max()), float(timesteps.min())
    edges = np.linspace(high, low, bins + 1)
    index = np.clip(((high - timesteps) / (high - low) * bins).astype(np.int64), 0, bins - 1)
    return index, [f"{edges[b]:.3g}-{edges[b + 1]:.3g}" for b in range(bins)]


def step_heatmap(counts: RoutingCounts, bins: int = 10, layers: Optional[Iterable[int]] = None) -> Figure:
    """Per layer: timestep x expert selection frequency, timesteps binned (top row: start of sampling)."""
    if len(counts.timesteps) == 0:
        raise RoutingFileError(f"{counts.source} has no timestep tags; record it with analysis/expert_data.py.")
    if bins < 1:
        raise ValueError(f"bins must be at least 1, got {bins}.")
    index, labels = timestep_bins(counts.timesteps, bins)
    nbins = len(labels)
    binned = np.zeros((len(counts.moe_layers), nbins, counts.num_experts), np.int64)
    tokens = np.zeros(nbins, np.int64)
    np.add.at(binned, (slice(None), index), counts.by_timestep)
    np.add.at(tokens, index, counts.tokens_by_timestep)
    freq = frequencies(binned, tokens)
    return _row_heatmaps(
        counts, freq, labels, "timestep (noise -> data)", "Expert selection by denoising timestep", "Blues", layers
    )


def _grid(counts: RoutingCounts) -> tuple[int, int]:
    if counts.grid_size is None:
        raise RoutingFileError(
            f"{counts.source} records no patch grid size; record it from a DiT with analysis/expert_data.py."
        )
    return counts.grid_size


def patch_dominant_heatmap(counts: RoutingCounts, layers: Optional[Iterable[int]] = None) -> Figure:
    """Per layer: the expert chosen most often at each patch position, on the image's patch grid."""
    rows, cols = _grid(counts)
    E = counts.num_experts
    slots = counts.layer_slots(layers)
    fig, axes = _panels(len(slots))
    base = plt.get_cmap("tab10" if E <= 10 else "tab20" if E <= 20 else "viridis")
    cmap = ListedColormap([base(e / max(E - 1, 1)) if E > 20 else base(e) for e in range(E)]).with_extremes(bad="white")
    norm = BoundaryNorm(np.arange(E + 1) - 0.5, E)
    for ax, slot in zip(axes, slots):
        dominant = np.ma.masked_array(counts.by_position[slot].argmax(axis=1), counts.tokens_by_position == 0)
        image = ax.imshow(dominant.reshape(rows, cols), cmap=cmap, norm=norm, interpolation="nearest")
        ax.set_title(f"MoE layer {counts.moe_layers[slot]}")
        ax.set_xlabel("patch column")
        ax.set_ylabel("patch row")
    bar = fig.colorbar(image, ax=axes, label="most frequent expert", shrink=0.9)
    tick_stride = max(1, math.ceil(E / 16))
    bar.set_ticks(np.arange(0, E, tick_stride))
    fig.suptitle("Dominant expert per patch position")
    return fig


def patch_expert_heatmap(counts: RoutingCounts, layers: Optional[Iterable[int]] = None) -> Figure:
    """Per layer and expert: the fraction of tokens at each patch position that choose the expert (rows: layers)."""
    rows, cols = _grid(counts)
    E = counts.num_experts
    slots = counts.layer_slots(layers)
    freq = frequencies(counts.by_position, counts.tokens_by_position)
    fig, axes = _panels(len(slots) * E, ncols=E, size=(1.8, 1.8))
    vmax = max(float(np.nanmax(freq[slots])), 1e-9)
    for i, slot in enumerate(slots):
        for e in range(E):
            ax = axes[i * E + e]
            image = ax.imshow(
                freq[slot, :, e].reshape(rows, cols), cmap="Greens", vmin=0.0, vmax=vmax, interpolation="nearest"
            )
            ax.set_title(f"layer {counts.moe_layers[slot]}, expert {e}", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
            if e == 0:
                ax.set_ylabel("patch row")
            if i == len(slots) - 1:
                ax.set_xlabel("patch column")
    fig.colorbar(image, ax=axes, label=FREQUENCY_LABEL, shrink=0.9)
    fig.suptitle("Where each expert is chosen on the patch grid")
    return fig


def panel_axes(fig: Figure) -> list:
    """The panels of a figure from this module (its axes other than colour bars)."""
    return [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Write `fig` as a PNG atomically and close it."""
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi, format="png")
    finally:
        plt.close(fig)
    return Path(path)
