"""Expert parallelism: the all-to-all dispatch between an MoE layer's dispatch and combine."""

from .expert_parallel import AllToAllStats, ExpertParallel, shard_experts

__all__ = ["AllToAllStats", "ExpertParallel", "shard_experts"]
