"""Router state the trainer keeps right beyond the training step: expert choice's inference thresholds
for the weights that sample, and a warning when a resume changes the tokens it selects over.
(The sigmoid-bias update hangs on the optimizer step: `build.register_router_updates`.)

Thresholds for the EMA. Training calibrates each router's threshold on the live gate, per rank
(router_expert_choice.py); sampling uses the EMA's weights, whose scores differ. Before an export,
`ema_router_state` puts the EMA's weights into the module (a host copy of the live ones restores
them), zeroes the thresholds, runs `CALIBRATION_BATCHES` training-mode forwards without gradients
on training micro-batches (data, timesteps, noise and label dropout drawn as in training, so each
expert takes its C tokens of the same M as in training), averages the thresholds over ranks (one
all-reduce), and returns them for the EMA's state; the live thresholds come back as they were.

Cost per rank for DiT-MoE-G/2 16E2A on 64 GPUs, once per export: a host copy of the rank's weights
(bf16: 2 bytes per local parameter; the export already gathers the whole model in fp32 on the host),
`CALIBRATION_BATCHES` forward passes of one micro-batch, one all-reduce of 2 x L x E floats.
Under ZeRO-3 the weights are partitioned and gathered by DeepSpeed's hooks, which this swap does
not reach: the export then keeps the thresholds the live gate calibrated in training, with a warning.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator, Optional

import torch
import torch.distributed as dist

from ..checkpoint import layout
from ..models import DiTConfig
from ..models.router_expert_choice import ExpertChoiceRouter, expert_choice_routers
from .config import BatchPlan

if TYPE_CHECKING:
    from .loop import Run

log = logging.getLogger("dit_moe.train")

CALIBRATION_BATCHES = 8  # micro-batches per rank; with the debiased EMA of momentum 0.99 about their mean


def warn_if_routing_batch_changes(config: DiTConfig, resumed: Optional[layout.RunShape], plan: BatchPlan) -> None:
    """Expert choice selects over each rank's micro-batch, so a resume with another per-rank
    micro-batch changes which tokens every expert takes, hence the losses (not the data or draws)."""
    if config.moe is None or config.moe.router != "expert-choice" or resumed is None or resumed.micro_batch is None:
        return
    if resumed.micro_batch != plan.micro_batch:
        log.warning(
            "Expert choice routes over each process's micro-batch, which changes from %d to %d samples on this "
            "resume: every expert now picks its tokens among %d images, so the losses differ from an "
            "uninterrupted run's; resume with --micro-batch-size %d (adjusting --grad-accum-steps) to continue exactly.",
            resumed.micro_batch,
            plan.micro_batch,
            plan.micro_batch,
            resumed.micro_batch,
        )


@contextmanager
def ema_weights(run: "Run") -> Iterator[None]:
    """The EMA's weights in the live (unpartitioned) module inside the block, the live ones after."""
    params = run.ema.params
    saved = {name: p.data.to("cpu", copy=True) for name, p in params.items()}
    try:
        for name, tensor in run.ema.live_shaped():  # one whole tensor at a time: the EMA keeps fragments
            params[name].data.copy_(tensor)
        yield
    finally:
        for name, p in params.items():
            p.data.copy_(saved[name])


@torch.no_grad()
def _calibration_forward(run: "Run", index: int) -> None:
    """One training-mode forward on a training micro-batch, drawn as the training step draws them."""
    x, y = next(run.loader)
    x, y = x.to(run.device), y.to(run.device)
    if run.codec is not None:
        x = run.codec.encode(x)
    key = (run.cfg.run.seed, run.step, run.plan.grad_accum + index)  # micro-steps no training step draws
    draws = run.objective.draw(
        key, run.plan.micro_batch * run.ranks.world_size, run.draw_spec, run.device, run.ranks.positions
    )
    module = run.engine.module

    def model_fn(x_t, t, y):
        return module(x_t.to(run.model_dtype), t, y, force_drop_ids=draws.drop, mask=draws.mask).float()

    run.objective.process.training_losses(model_fn, x.float(), draws.t, model_kwargs=dict(y=y), noise=draws.noise)


def _average_over_ranks(routers: dict[str, ExpertChoiceRouter], world_size: int) -> None:
    """Mean threshold over ranks (every rank ran as many forwards, so threshold_norm agrees)."""
    packed = torch.stack([r.threshold for r in routers.values()])  # L x [E] -> [L, E]
    if world_size > 1:
        dist.all_reduce(packed)
        packed /= world_size
    for router, threshold in zip(routers.values(), packed):
        router.threshold.copy_(threshold)


def ema_router_state(run: "Run", batches: int = CALIBRATION_BATCHES) -> dict[str, torch.Tensor]:
    """The expert-choice thresholds calibrated for the EMA's weights, as EMA state-dict entries
    (fp32, CPU); {} for other routers. A collective: every rank calls it."""
    module = run.engine.module
    routers = expert_choice_routers(module)
    if not routers:
        return {}
    if any(hasattr(p, "ds_tensor") for p in module.parameters()):
        log.warning(
            "ZeRO-3: the export's EMA keeps the expert-choice thresholds calibrated on the live weights in training."
        )
        return {}
    live = {name: (r.threshold.clone(), r.threshold_norm.clone()) for name, r in routers.items()}
    was_training = module.training
    module.train()
    try:
        with ema_weights(run):
            for router in routers.values():
                router.reset_calibration()
            for index in range(batches):
                _calibration_forward(run, index)
            _average_over_ranks(routers, run.ranks.world_size)
        state = {}
        for name, router in routers.items():
            state[f"{name}.threshold"] = router.threshold.detach().float().cpu().clone()
            state[f"{name}.threshold_norm"] = router.threshold_norm.detach().float().cpu().clone()
    finally:
        for name, router in routers.items():
            router.threshold.copy_(live[name][0])
            router.threshold_norm.copy_(live[name][1])
            router.calibrated = bool(live[name][1] > 0)  # host sync: once per export
        module.train(was_training)
    log.info("Calibrated the expert-choice thresholds of the EMA weights on %d micro-batches per process.", batches)
    return state
