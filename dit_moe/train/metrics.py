"""Training metrics: JSON lines, TensorBoard and a loss-curve PNG, written by rank 0."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


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
