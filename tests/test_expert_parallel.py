"""All-to-all expert dispatch on 2 gloo ranks (torch.multiprocessing) against the single-process MoE layer.

Each rank holds the whole layer's reference copy and the global batch; it runs the reference on
the whole batch and the expert-parallel layer (half the experts) on its half. The loss is a sum,
so the reference gradients are the sum of the ranks' gradients: non-expert gradients summed over
ranks, and a rank's expert gradients (accumulated from every rank's tokens by the backward
all-to-all), must equal the reference's.
"""

import copy

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dit_moe.models.config import MoEArgs
from dit_moe.models.moe import MoEFeedForward
from dit_moe.parallel import ExpertParallel, shard_experts

from trainer_runs import free_port

pytestmark = pytest.mark.multiproc
C, WORLD, E = 16, 2, 4


def _layer_and_batch(case: str):
    torch.manual_seed(0)
    layer = MoEFeedForward(
        C,
        2 * C,
        MoEArgs(
            num_experts=E, num_experts_per_tok=2, n_shared_experts=1, expert_type="gelu" if case == "gelu" else "swiglu"
        ),
    ).train()
    x = torch.randn(2 * WORLD, 5, C)  # [N, T, C]: 2 samples per rank
    if case == "cross":
        # Feature 0 decides the experts: > 0 -> experts 2, 3 (rank 1's), < 0 -> experts 0, 1 (rank 0's).
        # Rank 0's samples get feature 0 > 0 and rank 1's < 0: every token crosses to the other rank.
        with torch.no_grad():
            layer.gate.weight.zero_()
            layer.gate.weight[:, 0] = torch.tensor([-4.0, -3.0, 3.0, 4.0])
            x[:, :, 0] = x[:, :, 0].abs() + 0.5
            x[2:, :, 0] *= -1
    return layer, x, torch.randn_like(x)


def _worker(rank: int, port: int, case: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        reference, x, w = _layer_and_batch(case)
        layer = copy.deepcopy(reference)
        x_ref = x.clone().requires_grad_()
        y_ref, _ = reference(x_ref)
        (y_ref * w).sum().backward()

        ep = ExpertParallel(None, E)
        local_params = shard_experts(layer, ep)
        assert all(p.shape[0] == E // WORLD for p in local_params)
        mine = slice(rank * 2, rank * 2 + 2)
        x_mine = x[mine].clone().requires_grad_()
        y, _ = layer(x_mine)
        (y * w[mine]).sum().backward()

        torch.testing.assert_close(y, y_ref[mine], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(x_mine.grad, x_ref.grad[mine], rtol=1e-5, atol=1e-6)
        experts = {id(p) for p in local_params}
        for (name, p), p_ref in zip(layer.named_parameters(), reference.parameters()):
            grad = p.grad.clone()
            if id(p) in experts:
                expected = p_ref.grad[ep.first_expert : ep.first_expert + ep.num_local]
            else:
                dist.all_reduce(grad)
                expected = p_ref.grad
            torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-6, msg=name)

        stats = ep.take_stats()
        if case == "cross":  # all 2 samples x 5 tokens x top-2 copies leave, and as many arrive
            assert stats.tokens_sent == stats.tokens_received == 2 * 5 * 2
        row_bytes = C * 4
        # forward: copies out, outputs back; backward: the same two exchanges reversed
        assert stats.bytes_sent == stats.bytes_received == 2 * (stats.tokens_sent + stats.tokens_received) * row_bytes
        assert stats.all_to_all_s > 0
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("case", ["random", "cross", "gelu"])
def test_expert_parallel_matches_single_process(case):
    mp.spawn(_worker, args=(free_port(), case), nprocs=WORLD, join=True)
