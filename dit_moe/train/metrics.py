"""Training metrics: what accumulates on device between log steps, and its record written by rank 0
as JSON lines, TensorBoard scalars and a loss-curve PNG."""

from __future__ import annotations

import json
import time
from dataclasses import fields
from pathlib import Path
from typing import Any, Optional

import matplotlib
import torch
import torch.distributed as dist

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ..models.moe import moe_load_stats  # noqa: E402
from ..parallel import AllToAllStats, ExpertParallel  # noqa: E402


class LoadTracker:
    """Routed tokens per expert of every MoE layer (`moe_load_stats`), summed on device between log steps."""

    def __init__(self, model: torch.nn.Module, device: torch.device):
        self.model = model
        counts = self._counts()
        self.total = torch.zeros_like(counts, device=device) if counts is not None else None

    def _counts(self) -> Optional[torch.Tensor]:
        """[layer, expert] token counts of the last forward; None for a dense model."""
        stats = moe_load_stats(self.model)
        return torch.stack([s["tokens_per_expert"] for s in stats.values()]) if stats else None

    def add(self) -> None:
        if self.total is not None:
            self.total += self._counts()

    def reduced(self) -> Optional[torch.Tensor]:
        """The window's counts summed over ranks (a collective)."""
        if self.total is None:
            return None
        load = self.total.clone()
        dist.all_reduce(load)
        return load

    @staticmethod
    def summary(reduced: Optional[torch.Tensor]) -> dict[str, float]:
        """Per layer max/mean load and coefficient of variation, averaged (and the worst layer's max/mean)."""
        if reduced is None:
            return {}
        ratio = reduced.max(dim=1).values / reduced.mean(dim=1).clamp_min(1e-9)
        cv = reduced.std(dim=1, unbiased=False) / reduced.mean(dim=1).clamp_min(1e-9)
        return {
            "expert_load_max_over_mean": ratio.mean().item(),
            "expert_load_max_over_mean_worst": ratio.max().item(),
            "expert_load_cv": cv.mean().item(),
        }


class Window:
    """What accumulates on device between two log steps: loss sums by name, expert loads, steps, time."""

    def __init__(self, loads: LoadTracker):
        self.loads = loads
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.steps = 0
        self.start = time.perf_counter()
        if self.loads.total is not None:
            self.loads.total.zero_()

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def add(self, losses: dict[str, torch.Tensor]) -> None:
        """One micro-batch's losses (and the expert loads of its forward); no host sync."""
        self.loads.add()
        for name, value in losses.items():
            self.sums[name] = self.sums.get(name, 0.0) + value.detach().float()


def expert_parallel_record(ep: ExpertParallel, steps: int, device: torch.device) -> dict[str, list[float]]:
    """Every rank's all-to-all traffic and time per optimizer step since the last log (a collective)."""
    local = ep.take_stats().as_tensor().to(device)
    per_rank = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(per_rank, local)
    table = (torch.stack(per_rank) / steps).T.tolist()  # host sync: logging; [rank, stat] -> [stat][rank]
    return {f"ep_{f.name}": values for f, values in zip(fields(AllToAllStats), table)}


class MetricsWriter:
    """Appends one JSON object per logged step to metrics.jsonl and mirrors scalars to TensorBoard."""

    def __init__(self, results_dir: Path, enabled: bool):
        self.enabled = enabled
        self.path = results_dir / "metrics.jsonl"
        self.tensorboard = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(results_dir / "tensorboard"))

    def write(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **values}
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        for key, value in values.items():
            if isinstance(value, (int, float)):
                self.tensorboard.add_scalar(key, value, step)
            elif isinstance(value, list):  # one value per rank
                for rank, item in enumerate(value):
                    self.tensorboard.add_scalar(f"{key}/rank{rank}", item, step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss_curve(metrics_path: Path, out_path: Path, title: Optional[str] = None) -> Optional[Path]:
    """Loss (and MoE aux losses, on a second axis) against step; None when nothing was logged."""
    records = read_metrics(metrics_path)
    records = [r for r in records if "loss" in r]
    if not records:
        return None
    steps = [r["step"] for r in records]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    ax.plot(steps, [r["loss"] for r in records], label="diffusion loss", color="tab:blue")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    aux_keys = sorted({k for r in records for k in r if k.startswith("moe_")})
    if aux_keys:
        aux_ax = ax.twinx()
        for key, color in zip(aux_keys, ("tab:orange", "tab:green", "tab:red")):
            aux_ax.plot(steps, [r.get(key, float("nan")) for r in records], label=key, color=color, alpha=0.8)
        aux_ax.set_ylabel("weighted aux loss")
        aux_ax.legend(loc="upper right", fontsize=8)
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(title or "training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_path)
    plt.close(fig)
    return out_path
