"""`make_plan`: one model on one cluster, answered as the JSON object `python -m dit_moe.plan --json` prints."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from ..models import DiTConfig
from ..models.flops import TRAINING_FACTOR, forward_flops
from .activations import ActivationSpec, activation_bytes, visible_tokens
from .cluster import ClusterSpec
from .memory import model_state_bytes
from .params import ParamCounts, count_parameters
from .traffic import all_to_all_bytes, checkpoint_bytes

GIB = 2**30
MAX_MICRO_BATCH_SEARCHED = 4096


@dataclass(frozen=True)
class Plan:
    """A model (`config`, trained at `mask_ratio`) on a cluster (`cluster`); `image_size` is only reported."""

    config: DiTConfig
    cluster: ClusterSpec
    model_name: str
    image_size: int
    mask_ratio: float = 0.0


def _activation_spec(plan: Plan, micro_batch: int) -> ActivationSpec:
    cluster = plan.cluster
    half = cluster.param_bytes == 2
    grouped = plan.config.moe is not None and plan.config.moe.grouped_gemm != "off" and half
    return ActivationSpec(micro_batch, cluster.param_bytes, cluster.grad_checkpointing, plan.mask_ratio, grouped)


def per_gpu_bytes(plan: Plan, counts: ParamCounts, micro_batch: int) -> dict[str, float]:
    """params, grads, optimizer, ema, activations, buffers and their total, in bytes, for one GPU."""
    parts = model_state_bytes(counts, plan.cluster)
    parts["activations"] = activation_bytes(plan.config, _activation_spec(plan, micro_batch))
    parts = {k: parts[k] for k in ("params", "grads", "optimizer", "ema", "activations", "buffers")}
    return {**parts, "total": sum(parts.values())}


def max_micro_batch(plan: Plan, counts: ParamCounts) -> int:
    """The largest micro-batch whose total fits the GPU (0: not even one image), by bisection."""
    budget = plan.cluster.gpu_memory_gib * GIB
    low, high = 0, MAX_MICRO_BATCH_SEARCHED
    while low < high:
        middle = (low + high + 1) // 2
        if per_gpu_bytes(plan, counts, middle)["total"] <= budget:
            low = middle
        else:
            high = middle - 1
    return low


def make_plan(plan: Plan, counts: Optional[ParamCounts] = None) -> dict[str, Any]:
    """Everything the planner reports, as a JSON-ready dict (bytes as GiB where the key says so).

    `counts`: the model's `count_parameters`, when the caller has them (a sweep builds the model once)."""
    cluster = plan.cluster
    counts = counts or count_parameters(plan.config, cluster.setting("stage3_param_persistence_threshold"))
    memory = per_gpu_bytes(plan, counts, cluster.micro_batch)
    forward = sum(forward_flops(plan.config, visible_tokens(plan.config, plan.mask_ratio)).values())
    step_flops = TRAINING_FACTOR * forward * cluster.micro_batch
    checkpoint = checkpoint_bytes(counts, cluster)
    return {
        "model": {"name": plan.model_name, "shape": plan.config.moe_shape, "image_size": plan.image_size},
        "cluster": {k: v for k, v in dataclasses.asdict(cluster).items() if k != "zero_settings"}
        | {"world_size": cluster.world_size},
        "parameters": {
            "total": counts.total,
            "dense": counts.dense,
            "expert": counts.expert,
            "frozen": counts.frozen,
            "per_gpu": int(counts.dense + counts.expert / cluster.ep_size + counts.frozen),
        },
        "per_gpu_gib": {k: v / GIB for k, v in memory.items()},
        "fits": memory["total"] <= cluster.gpu_memory_gib * GIB,
        "max_micro_batch": max_micro_batch(plan, counts),
        "checkpoint_gib": {k: v / GIB for k, v in checkpoint.items()},
        "all_to_all_bytes_per_step": all_to_all_bytes(plan.config, cluster, plan.mask_ratio),
        "flops_per_image": {"forward": forward, "training": TRAINING_FACTOR * forward},
        "step_time_s": step_flops / (cluster.mfu * cluster.peak_tflops * 1e12),
        "step_time_at_mfu": cluster.mfu,
    }


def sweep(plan: Plan) -> list[dict[str, Any]]:
    """`make_plan` for every ZeRO stage and --ep-size the trainer can run on this cluster and model, each at its
    largest micro-batch (the plan's own micro-batch where nothing fits)."""
    counts = count_parameters(plan.config, plan.cluster.setting("stage3_param_persistence_threshold"))
    experts = plan.config.num_experts
    sizes = [ep for ep in range(1, plan.cluster.world_size + 1) if plan.cluster.world_size % ep == 0]
    sizes = [ep for ep in sizes if ep == 1 or (experts and experts % ep == 0)]
    rows = []
    for zero, ep in [(1, ep) for ep in sizes] + [(2, ep) for ep in sizes] + [(3, 1)]:
        shaped = dataclasses.replace(plan, cluster=dataclasses.replace(plan.cluster, zero=zero, ep_size=ep))
        largest = max_micro_batch(shaped, counts)
        at = dataclasses.replace(shaped.cluster, micro_batch=largest or plan.cluster.micro_batch)
        rows.append(make_plan(dataclasses.replace(shaped, cluster=at), counts))
    return rows
