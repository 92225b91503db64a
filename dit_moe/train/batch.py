"""How a global batch splits into micro-batches, accumulation steps and processes, reconciled once."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .sections import RunSection

RESUME_BATCH_RULE = (
    "on another number of processes the global batch stays the checkpoint's: the micro batch and accumulation "
    "flags are used if given (their product with the processes must be that batch), else the accumulation is kept "
    "and micro = global / (accumulation x processes), else the smallest larger accumulation that divides; "
    "a number of processes that does not divide the global batch stops"
)


@dataclass(frozen=True)
class BatchPlan:
    """micro_batch x grad_accum x world_size == global_batch, reconciled once at start-up."""

    micro_batch: int
    grad_accum: int
    world_size: int

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.world_size

    @classmethod
    def resolve(cls, run: RunSection, world_size: int, ds_config: dict[str, Any]) -> "BatchPlan":
        """Fill in whichever of micro/accum/global is missing (from flags, then the DeepSpeed JSON)."""
        micro = run.micro_batch_size or ds_config.get("train_micro_batch_size_per_gpu")
        accum = run.grad_accum_steps or ds_config.get("gradient_accumulation_steps")
        total = run.global_batch_size or ds_config.get("train_batch_size")
        if micro is None and total is None:
            raise ValueError("Set a batch size: --global-batch-size N or --train_batch_size N (per process).")
        if micro is None:
            accum = accum or 1
            if total % (accum * world_size):
                raise ValueError(
                    f"Global batch {total} is not divisible by grad accumulation {accum} x world size {world_size}; "
                    f"choose a global batch that is a multiple of {accum * world_size}."
                )
            micro = total // (accum * world_size)
        elif accum is None:
            if total is None:
                accum = 1
            elif total % (micro * world_size):
                raise ValueError(
                    f"Global batch {total} is not divisible by micro batch {micro} x world size {world_size}; "
                    f"choose a global batch that is a multiple of {micro * world_size}."
                )
            else:
                accum = total // (micro * world_size)
        plan = cls(int(micro), int(accum), world_size)
        if total is not None and plan.global_batch != total:
            raise ValueError(
                f"Batch sizes disagree: micro batch {micro} x grad accumulation {accum} x world size {world_size} "
                f"= {plan.global_batch}, but the global batch is {total}."
            )
        if plan.micro_batch < 1 or plan.grad_accum < 1:
            raise ValueError(f"Global batch {total} is too small for world size {world_size}.")
        return plan

    @classmethod
    def for_resume(cls, run: RunSection, world_size: int, global_batch: int, grad_accum: int) -> "BatchPlan":
        """The plan that continues a checkpoint's `global_batch` on `world_size` processes (`RESUME_BATCH_RULE`).

        Keeping the accumulation keeps the global micro-batch, whose samples, noise and timesteps are
        drawn per (step, micro-step): the resumed steps are then those of the uninterrupted run.
        """
        if run.global_batch_size not in (None, global_batch):
            raise ValueError(
                f"The checkpoint continues global batch {global_batch}, not --global-batch-size "
                f"{run.global_batch_size}; drop the flag, or start a new run from its weights with --init-from."
            )
        if global_batch % world_size:
            raise ValueError(
                f"The checkpoint's global batch {global_batch} cannot be split over {world_size} processes; resume "
                f"on a number of processes that divides {global_batch}."
            )
        if run.micro_batch_size or run.grad_accum_steps:
            return cls.resolve(dataclasses.replace(run, global_batch_size=global_batch), world_size, {})
        per_process = global_batch // world_size
        accum = next(a for a in range(min(grad_accum, per_process), per_process + 1) if per_process % a == 0)
        return cls(per_process // accum, accum, world_size)
