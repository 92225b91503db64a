"""Expert-choice router: every expert picks its top-C tokens of the batch (Zhou et al., "Mixture-of-Experts
with Expert Choice Routing", NeurIPS 2022; for diffusion, EC-DiT, Sun et al. 2024).

Notation (as in router.py):
    M, E, k   tokens routed together (the micro-batch's N x T), experts, average experts per token
    s_{t,e}   softmax score of expert e for token t over the experts     -> `scores` [M, E]
    C         capacity, ceil(cf * M * k / E) tokens per expert (cf = capacity_factor, 1 by default),
              so the experts process cf * k * M token copies, the FLOPs of top-k token choice at cf = 1
    tau_e     inference threshold of expert e                            -> `threshold` / `threshold_norm`

Training: expert e takes the C tokens with the largest s_{t,e} over the M tokens, with weight
s_{t,e}; a token can be taken by any number of experts, none included (it then passes through
the residual and the shared experts only). Every expert is full, so there is no balancing loss.

Inference rule (batch-independent): selecting over the batch would make a sample's output depend
on the other samples and on the batch size, so in eval mode token t goes to expert e iff
s_{t,e} >= tau_e. tau_e is calibrated during training, like BatchNorm's running statistics: each
training forward takes the C-th largest score of every expert (the score of the last token it
accepted) and folds it into a debiased exponential moving average (momentum 0.99),
tau = threshold / threshold_norm with threshold_norm = 1 - 0.99^n after n forwards. Both are
persistent fp32 buffers, so checkpoints and exports carry them. An expert then takes, in expectation,
the share C / M of tokens it took in training. A router never calibrated (threshold_norm = 0,
also a file written for another router) falls back to the training rule over its batch.

The forward returns the dense slot layout [M, E]: slot e of token t holds expert e (id e,
weight s_{t,e}) when e took t, else the empty id E with weight 0; the MoE layer's dispatch drops
empty slots.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .router import LinearGate

THRESHOLD_MOMENTUM = 0.99


class ExpertChoiceRouter(LinearGate):
    """Softmax scores, each expert's top-C tokens in training, a calibrated threshold in eval mode."""

    empty_slots = True
    state_buffers = ("threshold", "threshold_norm")

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, capacity_factor: Optional[float] = None) -> None:
        super().__init__(hidden_size, num_experts, top_k)
        self.capacity_factor = 1.0 if capacity_factor is None else capacity_factor
        self.register_buffer("threshold", torch.zeros(num_experts))
        self.register_buffer("threshold_norm", torch.zeros(()))

    def capacity(self, num_tokens: int) -> int:
        """C = ceil(cf * M * k / E), at most M."""
        return min(num_tokens, math.ceil(self.capacity_factor * num_tokens * self.top_k / self.num_experts))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Route x [..., C]: returns fp32 weights [M, E], int64 expert_ids [M, E] (E: empty), fp32 scores [M, E]."""
        scores = self.logits(x).softmax(dim=-1)  # [M, E]
        top_scores, top_tokens = torch.topk(scores, k=self.capacity(scores.shape[0]), dim=0)  # [C, E] each
        chosen = torch.zeros_like(scores, dtype=torch.bool).scatter_(0, top_tokens, True)  # [M, E]
        if self.training:
            self._calibrate(top_scores[-1])
        else:
            calibrated = self.threshold_norm > 0
            tau = self.threshold / self.threshold_norm.clamp_min(1e-12)
            chosen = torch.where(calibrated, scores >= tau, chosen)
        experts = torch.arange(self.num_experts, device=scores.device).expand_as(scores)
        expert_ids = torch.where(chosen, experts, self.num_experts)
        return scores * chosen, expert_ids, scores

    @torch.no_grad()
    def _calibrate(self, last_accepted: Tensor) -> None:
        """Fold the C-th score of every expert [E] into the debiased EMA of the inference threshold."""
        self.threshold.mul_(THRESHOLD_MOMENTUM).add_(last_accepted, alpha=1 - THRESHOLD_MOMENTUM)
        self.threshold_norm.mul_(THRESHOLD_MOMENTUM).add_(1 - THRESHOLD_MOMENTUM)
