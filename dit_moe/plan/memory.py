"""Bytes of model state per GPU as DeepSpeed 0.19.8 (`deepspeed/runtime/zero/stage_1_and_2.py`, `stage3.py`)
and this trainer allocate them. W ranks, expert-parallel size ep, b bytes per parameter element (2 in
bf16/fp16, 4 in fp32), N_d dense and N_e routed-expert elements:

    ZeRO-1/2  params     b (N_d + N_e / ep)            every rank holds its whole (local-expert) model
              optimizer  12 (N_d + N_e) / W            fp32 master + Adam moments, partitioned: dense groups
                                                       over all W ranks, expert groups over the W / ep ranks
                                                       of their expert-data-parallel group (each already holds
                                                       1 / ep of the experts), so 1 / W of each either way
              grads      4 (N_d + N_e) / W: the fp32 partition each rank reduces its gradients into (low-precision
                         gradients are staged in the reduce buckets, see buffers); with expert parallelism a further
                         4 N_d / W, measured (the dense group's reduced gradients outlive its step)
    ZeRO-3    params     b (N_d + N_e) / W + b (tensors of <= persistence threshold elements, kept whole)
              optimizer  12 (N_d + N_e) / W
              grads      b (N_d + N_e) / W, the reduced partition, + 4 min(sub_group_size, (N_d + N_e) / W), its
                         fp32 copy for the step
    offload   optimizer state and the fp32 gradient copy live in host memory instead (0 on the GPU)

DeepSpeed's issue #7156 reads as if expert optimizer state were not partitioned under ZeRO-1/2 with
expert parallelism; in 0.19.8 it is (`_configure_moe_settings` sets each expert group's partition count
to its expert-data-parallel size), which the engine measurement in tests/test_plan_engine.py confirms.

Buffers: ZeRO-1/2 with contiguous gradients allocate reduce buckets of `reduce_bucket_size` elements (two with
overlap_comm) for every backward; ZeRO-3 gathers a whole MoE layer (a leaf module) and prefetches `stage3_prefetch_bucket_size`
elements; frozen parameters (fixed position embeddings) stay in the module at b bytes each.
"""

from __future__ import annotations

from .cluster import ClusterSpec
from .params import ParamCounts

FP32 = 4
ADAM_STATE_BYTES = 12  # fp32 master weights + exp_avg + exp_avg_sq


def local_elements(counts: ParamCounts, cluster: ClusterSpec) -> float:
    """Trainable elements one rank's module holds: the dense part and its 1 / ep of the experts."""
    return counts.dense + counts.expert / cluster.ep_size


def params_bytes(counts: ParamCounts, cluster: ClusterSpec) -> float:
    b = cluster.param_bytes
    if cluster.zero == 3:
        return b * counts.trainable / cluster.world_size + b * counts.persistent
    return b * local_elements(counts, cluster)


def optimizer_bytes(counts: ParamCounts, cluster: ClusterSpec) -> float:
    return 0.0 if cluster.offload else ADAM_STATE_BYTES * counts.trainable / cluster.world_size


def grads16_bytes(counts: ParamCounts, cluster: ClusterSpec) -> float:
    """The low-precision reduced-gradient partition: ZeRO-3 keeps one (`grad_partitions_flat_buffer`); ZeRO-1/2
    stage low-precision gradients in their reduce buckets (counted as buffers) and keep none."""
    return cluster.param_bytes * counts.trainable / cluster.world_size if cluster.zero == 3 else 0.0


def grads32_bytes(counts: ParamCounts, cluster: ClusterSpec) -> float:
    """The fp32 gradient partition the optimizer step reads (on the host under offload)."""
    if cluster.offload:
        return 0.0
    if cluster.zero == 3:
        return FP32 * min(cluster.setting("sub_group_size"), counts.trainable / cluster.world_size)
    measured_dense_copy = counts.dense / cluster.world_size if cluster.ep_size > 1 else 0.0
    return FP32 * (counts.trainable / cluster.world_size + measured_dense_copy)


def grads_bytes(counts: ParamCounts, cluster: ClusterSpec) -> float:
    return grads16_bytes(counts, cluster) + grads32_bytes(counts, cluster)


def ema_bytes_per_rank(counts: ParamCounts, cluster: ClusterSpec) -> float:
    """The trainer's fp32 EMA on one rank: it averages the fp32 master fragment the rank's optimizer owns
    (dit_moe.train.engine.EMA), so 4 B per trainable parameter / world size at every ZeRO stage."""
    if not cluster.ema:
        return 0.0
    return FP32 * counts.trainable / cluster.world_size


def in_flight_buffer_bytes(cluster: ClusterSpec, counts: ParamCounts) -> float:
    """Buffers alive during the forward and backward only: ZeRO-1/2's reduce buckets, ZeRO-3's gathered layer."""
    b = cluster.param_bytes
    if cluster.zero == 3:
        return b * (counts.largest_moe_layer + cluster.setting("stage3_prefetch_bucket_size"))
    if cluster.zero_settings.get("contiguous_gradients", True):
        buckets = 2 if cluster.zero_settings.get("overlap_comm", True) else 1
        return buckets * b * cluster.setting("reduce_bucket_size")
    return 0.0


def buffer_bytes(counts: ParamCounts, cluster: ClusterSpec) -> float:
    """Frozen parameters (in the module at b bytes each) and the in-flight buffers."""
    return cluster.param_bytes * counts.frozen + in_flight_buffer_bytes(cluster, counts)


def model_state_bytes(counts: ParamCounts, cluster: ClusterSpec) -> dict[str, float]:
    """Per-GPU bytes of params, grads, optimizer, ema and buffers."""
    return {
        "params": params_bytes(counts, cluster),
        "grads": grads_bytes(counts, cluster),
        "optimizer": optimizer_bytes(counts, cluster),
        "ema": ema_bytes_per_rank(counts, cluster),
        "buffers": buffer_bytes(counts, cluster),
    }
