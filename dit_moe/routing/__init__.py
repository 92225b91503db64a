"""Routing analysis: which experts every token uses, and the heatmaps of DiT-MoE's paper.

    with RoutingRecorder(model) as rec:             # forward hooks on every MoE router
        ...forwards...
    rec.save("routing.npz")                          # per-token expert ids, tagged rows
    counts = load_counts("routing.npz")              # class / position / timestep histograms
    fig = class_heatmap(counts)                      # also step_heatmap, patch_*_heatmap
    paths = analyse_routing(RoutingRequest.for_checkpoint("model.pt"), "out/")   # everything in one call

Files: recorder.py (hooks, buffering), store.py (the .npz format, validation),
stats.py (counts, summary), plots.py (heatmaps), collect.py (sampling through the prepare
step of dit_moe.sampling, and the one-call analysis), cli.py (`python -m dit_moe.routing` and
the analysis/ scripts).
"""

from .collect import (
    RoutingRequest,
    analyse_routing,
    collect_routing,
    default_classes,
    plot_routing,
    write_summary,
)
from .plots import class_heatmap, panel_axes, patch_dominant_heatmap, patch_expert_heatmap, save_figure, step_heatmap
from .recorder import RoutingRecorder, find_moe_layers
from .stats import RoutingCounts, count_routing, format_summary, load_counts, summarize
from .store import RoutingFile, RoutingFileError, write_routing

__all__ = [
    "RoutingRecorder",
    "find_moe_layers",
    "RoutingFile",
    "RoutingFileError",
    "write_routing",
    "RoutingCounts",
    "count_routing",
    "load_counts",
    "summarize",
    "format_summary",
    "class_heatmap",
    "step_heatmap",
    "patch_dominant_heatmap",
    "patch_expert_heatmap",
    "panel_axes",
    "save_figure",
    "RoutingRequest",
    "collect_routing",
    "analyse_routing",
    "plot_routing",
    "write_summary",
    "default_classes",
]
