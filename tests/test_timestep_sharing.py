"""Adaptive timestep sampling under data parallelism: every rank learns from the whole global batch."""

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dit_moe.diffusion import DrawSpec, Objective, create_diffusion
from dit_moe.diffusion.timesteps import LossSecondMomentTimesteps, UniformIndexTimesteps
from dit_moe.train.distributed import RankSlice

from trainer_runs import free_port

WORLD, T, HISTORY = 2, 4, 2
GLOBAL_T = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 3, 0])
GLOBAL_LOSS = torch.arange(1.0, 11.0)


def objective_with(sampler, gather=None) -> Objective:
    return Objective("iddpm", create_diffusion("", noise_schedule="cosine", diffusion_steps=T), sampler, gather=gather)


def _worker(rank: int, port: int, out) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        ranks = RankSlice(rank, WORLD)
        objective = objective_with(LossSecondMomentTimesteps(T, history=HISTORY), gather=ranks.gather)
        objective.observe(GLOBAL_T[ranks.positions], GLOBAL_LOSS[ranks.positions])  # this rank's slice
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
    sampler = UniformIndexTimesteps(T)
    sampler.update = lambda t, losses: pytest.fail("a non-adaptive sampler was fed losses")
    gather = lambda local: pytest.fail("a non-adaptive sampler cost a collective")  # noqa: E731
    objective_with(sampler, gather=gather).observe(GLOBAL_T, GLOBAL_LOSS)


def test_draws_are_one_global_draw_sliced_per_rank():
    """Any world size gives each sample the same draws; the same key gives the same stream."""
    objective = objective_with(LossSecondMomentTimesteps(T, history=HISTORY))
    spec = DrawSpec((2, 4, 4), label_dropout=0.5, mask_ratio=0.5, num_tokens=4)
    whole = objective.draw((0, 3, 1), 6, spec, "cpu")
    for rank in range(3):
        part = objective.draw((0, 3, 1), 6, spec, "cpu", RankSlice(rank, 3).positions)
        for name in ("t", "weights", "noise", "drop", "mask"):
            assert torch.equal(getattr(part, name), getattr(whole, name)[rank::3]), name
    again, other = objective.draw((0, 3, 1), 6, spec, "cpu"), objective.draw((0, 3, 2), 6, spec, "cpu")
    assert torch.equal(again.noise, whole.noise) and not torch.equal(other.noise, whole.noise)
    assert whole.mask.sum(dim=1).tolist() == [2] * 6 and whole.drop.dtype == torch.long
