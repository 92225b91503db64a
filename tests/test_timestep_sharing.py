"""Adaptive timestep sampling under data parallelism: every rank learns from the whole global batch."""

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dit_moe.diffusion.timesteps import LossSecondMomentTimesteps, UniformTimesteps
from dit_moe.train.loop import share_timestep_losses
from trainer_runs import free_port

WORLD, T, HISTORY = 2, 4, 2
GLOBAL_T = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 3, 0])
GLOBAL_LOSS = torch.arange(1.0, 11.0)


class Holder:
    def __init__(self, sampler):
        self.timesteps = sampler


def _worker(rank: int, port: int, out) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        objective = Holder(LossSecondMomentTimesteps(T, history=HISTORY))
        share_timestep_losses(objective, GLOBAL_T[rank::WORLD], GLOBAL_LOSS[rank::WORLD])  # this rank's slice
        out[rank] = (objective.timesteps.loss_history.copy(), objective.timesteps.probabilities())
    finally:
        dist.destroy_process_group()


@pytest.mark.multiproc
def test_two_ranks_keep_the_history_one_process_would():
    out = mp.Manager().dict()
    mp.spawn(_worker, args=(free_port(), out), nprocs=WORLD, join=True)
    single = LossSecondMomentTimesteps(T, history=HISTORY)
    single.update(GLOBAL_T, GLOBAL_LOSS)
    for rank in range(WORLD):
        history, probabilities = out[rank]
        np.testing.assert_array_equal(history, single.loss_history)  # same order, so the same FIFO contents
        np.testing.assert_array_equal(probabilities, single.probabilities())
    assert not np.allclose(single.probabilities(), 1 / T)  # the history is full: p has adapted


def test_samplers_that_do_not_learn_are_not_fed():
    sampler = UniformTimesteps(T)
    sampler.update = lambda t, losses: pytest.fail("a non-adaptive sampler was fed losses")
    share_timestep_losses(Holder(sampler), GLOBAL_T, GLOBAL_LOSS)
