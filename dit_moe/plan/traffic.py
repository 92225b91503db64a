"""What a step sends and what a checkpoint writes, per rank: expert-parallel all-to-all bytes and checkpoint files.

All-to-all (per rank, per micro-batch): every MoE layer sends its token copies to the experts' owners and
back (dispatch and combine), in the forward and again in the backward (their gradients), and once more in
the recomputed forward under gradient checkpointing. With balanced routing a fraction (ep - 1) / ep of the
M k copies (M tokens of the micro-batch, k experts each) leaves the rank, each C elements wide.

Checkpoint (the trainer's tag layout): every rank writes its optimizer partition (fp32 master and Adam
moments, 12 bytes per element / W) with a global index, which any shape reads back by ranges; rank 0 also
writes the module's weights (b bytes per element it holds) and the full fp32 EMA (4 bytes per parameter),
gathered and streamed one tensor at a time; the first rank of each expert-data-parallel group writes its
experts (b N_e / ep). At DiT-MoE-G/2 16E2A on 64 GPUs rank 0's EMA file is its largest write.
"""

from __future__ import annotations

from ..models import DiTConfig
from .activations import visible_tokens
from .cluster import ClusterSpec
from .memory import ADAM_STATE_BYTES, FP32, local_elements
from .params import ParamCounts


def all_to_all_bytes(config: DiTConfig, cluster: ClusterSpec, mask_ratio: float) -> float:
    """Bytes one rank sends through expert-parallel all-to-alls in one forward and backward of its micro-batch."""
    if cluster.ep_size == 1 or config.moe is None:
        return 0.0
    moe_layers = sum(config.is_moe_block(i) for i in range(config.depth))
    copies = cluster.micro_batch * visible_tokens(config, mask_ratio) * config.moe.num_experts_per_tok
    passes = 2 * (3 if cluster.grad_checkpointing else 2)  # (dispatch + combine) x (forward, backward[, recompute])
    leaving = (cluster.ep_size - 1) / cluster.ep_size
    return moe_layers * passes * copies * leaving * config.hidden_size * cluster.param_bytes


def checkpoint_bytes(counts: ParamCounts, cluster: ClusterSpec) -> dict[str, float]:
    """Bytes of one checkpoint: `per_rank` (rank 0, the largest writer) and `total` over all ranks.

    Every rank writes its partition of the fp32 master and AdamW moments (the sharded resumable state, or
    with --elastic-checkpoints false DeepSpeed's optimizer files: the same bytes); rank 0 also writes
    DeepSpeed's module file and the whole fp32 EMA (dit_moe.train.checkpointer)."""
    partition = ADAM_STATE_BYTES * counts.trainable / cluster.world_size
    b = cluster.param_bytes
    held = counts.trainable / cluster.world_size if cluster.zero == 3 else local_elements(counts, cluster)
    module = b * (counts.frozen + held)
    rank0 = partition + module + FP32 * counts.total
    experts = b * counts.expert / cluster.ep_size if cluster.ep_size > 1 else 0.0
    others = partition * (cluster.world_size - 1)
    return {"per_rank": rank0 + experts, "total": rank0 + experts * cluster.ep_size + others}
