"""Cluster planner: what a DiT-MoE run costs per GPU before it is booked.

`python -m dit_moe.plan` takes the trainer's model flags and the cluster's shape and answers, per GPU:
parameters, gradients, optimizer state, EMA, activations and buffers (bytes DeepSpeed 0.19.8 and this
trainer actually allocate), whether it fits, the largest micro-batch that does, the checkpoint size, the
expert-parallel all-to-all traffic and the step time at a stated MFU. Its cost is one model build on
torch's meta device (no memory, a few seconds for DiT-MoE-G/2 16E2A) and arithmetic.
"""

from .cluster import ClusterSpec
from .report import Plan, make_plan

__all__ = ["ClusterSpec", "Plan", "make_plan"]
