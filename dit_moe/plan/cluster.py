"""`ClusterSpec`: the cluster and engine settings a plan is made for, checked before any arithmetic."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..utils.errors import UserError

PRECISION_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
# DeepSpeed 0.19.8's ZeRO defaults (deepspeed/runtime/zero/config.py), used where the config names none.
ZERO_DEFAULTS = {
    "reduce_bucket_size": 5e8,
    "allgather_bucket_size": 5e8,
    "sub_group_size": 1e9,
    "stage3_prefetch_bucket_size": 5e7,
    "stage3_param_persistence_threshold": 1e5,
    "overlap_comm": True,
    "contiguous_gradients": True,
}


@dataclass
class ClusterSpec:
    """Where and how the model is trained: GPUs, ZeRO stage, expert parallelism, micro-batch, precision."""

    nodes: int = 1
    gpus_per_node: int = 8
    gpu_memory_gib: float = 80.0  # usable memory of one GPU
    zero: int = 2  # ZeRO stage 1, 2 or 3
    ep_size: int = 1  # expert-parallel group size (--ep-size)
    micro_batch: int = 32  # images per GPU per forward/backward
    precision: str = "bf16"  # bf16 | fp16 | fp32 (parameters, gradients and activations)
    grad_checkpointing: bool = False
    ema: bool = True  # the trainer keeps an fp32 EMA of the weights
    offload: bool = False  # ZeRO-Offload: optimizer state and its step on the host (zero*_offload.json)
    mfu: float = 0.4  # model FLOP utilisation the step time is quoted at
    peak_tflops: float = 989.4  # dense bf16 peak of one GPU (H100/H200 SXM)
    zero_settings: dict[str, Any] = field(default_factory=lambda: dict(ZERO_DEFAULTS))

    def __post_init__(self) -> None:
        if self.zero not in (1, 2, 3):
            raise UserError(f"--zero must be 1, 2 or 3, got {self.zero}.")
        if self.precision not in PRECISION_BYTES:
            raise UserError(f"--precision must be one of {sorted(PRECISION_BYTES)}, got {self.precision!r}.")
        for name in ("nodes", "gpus_per_node", "ep_size", "micro_batch"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}.")
        if self.gpu_memory_gib <= 0 or not 0 < self.mfu <= 1 or self.peak_tflops <= 0:
            raise UserError("--gpu-memory and --peak-tflops must be positive and --mfu must lie in (0, 1].")
        if self.world_size % self.ep_size:
            raise UserError(
                f"--ep-size {self.ep_size} does not divide the {self.world_size} GPUs; pick a divisor of {self.world_size}."
            )
        if self.ep_size > 1 and self.zero == 3:
            raise UserError(
                f"The trainer cannot run --ep-size {self.ep_size} under ZeRO-3 (DeepSpeed partitions expert "
                f"parameters only under ZeRO-1/2); plan with --zero 1 or 2, or with --ep-size 1."
            )

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def expert_data_parallel(self) -> int:
        """Ranks holding the same experts: DeepSpeed partitions expert optimizer state over this group."""
        return self.world_size // self.ep_size

    @property
    def param_bytes(self) -> int:
        return PRECISION_BYTES[self.precision]

    def setting(self, name: str) -> float:
        return float(self.zero_settings.get(name, ZERO_DEFAULTS[name]))


def zero_settings_from_file(path: Optional[str]) -> dict[str, Any]:
    """The `zero_optimization` section of a DeepSpeed JSON over DeepSpeed's defaults (none: the defaults)."""
    settings = dict(ZERO_DEFAULTS)
    if path is None:
        return settings
    file = Path(path)
    if not file.is_file():
        raise UserError(f"DeepSpeed config {path} does not exist; pass one of config/zero*.json or leave it out.")
    settings.update(json.loads(file.read_text()).get("zero_optimization", {}))
    return settings
