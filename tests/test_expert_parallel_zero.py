"""DeepSpeed's expert handling under ZeRO-1/2, checked directly against plain torch on the whole batch.

Known DeepSpeed traps this guards against:
- expert gradients N times too large (deepspeedai/DeepSpeed#5618): reduced over the
  expert-data-parallel group but averaged by that group's size instead of the data-parallel size;
- expert optimizer state not partitioned under ZeRO-2 (#7156): every expert-data-parallel rank
  holding the whole Adam state of its experts.
The file is also the worker: the deepspeed launcher runs it on W CPU processes with ep_size 2.
Every rank builds the same layer, keeps its experts, takes its slice of the global batch and
compares DeepSpeed's reduced gradients (`safe_get_full_grad`), its fp32 partitions and Adam
state sizes, and the weights after one step, with the unsharded layer on the whole batch.
"""

import copy
import math
import subprocess
import sys

import pytest
import torch
from torch import nn

from dit_moe.models.config import MoEArgs
from dit_moe.models.moe import MoEFeedForward

from trainer_runs import REPO, free_port
from trainer_runs import env as trainer_env

C, EP_SIZE, PER_RANK, LR = 16, 2, 2, 1e-3


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.moe = MoEFeedForward(
            C, 2 * C, MoEArgs(num_experts=4, num_experts_per_tok=2, n_shared_experts=1, aux_loss_coef=0.0)
        )

    def forward(self, x, target):
        y, _ = self.moe(x)
        return (y - target).square().mean()


def _ds_config(stage: int, world: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": PER_RANK,
        "gradient_accumulation_steps": 1,
        "train_batch_size": PER_RANK * world,
        "steps_per_print": 10**9,
        "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": 0.0}},
        "zero_optimization": {"stage": stage, "contiguous_gradients": True, "overlap_comm": False},
    }


def _check_stage(stage: int, rank: int, world: int) -> None:
    from deepspeed.moe.utils import is_moe_param
    from deepspeed.utils import safe_get_full_grad

    from dit_moe.train import engine as engine_lib

    torch.manual_seed(0)
    net = _Net()
    reference = copy.deepcopy(net)
    x, target = torch.randn(PER_RANK * world, 5, C), torch.randn(PER_RANK * world, 5, C)
    reference(x, target).backward()  # the global mean = the data-parallel average of the ranks' means
    torch.optim.AdamW(reference.parameters(), lr=LR, weight_decay=0.0).step()

    ep = engine_lib.setup_expert_parallel(net, EP_SIZE)
    engine = engine_lib.initialize(net, _ds_config(stage, world), ep)
    mine = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    engine.backward(engine(x[mine], target[mine]))
    expected = {name: p for name, p in reference.named_parameters()}

    def local(tensor, param):
        return ep.local_slice(tensor) if is_moe_param(param) else tensor

    for name, param in engine.module.named_parameters():
        grad = safe_get_full_grad(param)
        torch.testing.assert_close(
            grad, local(expected[name].grad, param), rtol=1e-5, atol=1e-7, msg=f"stage {stage} grad {name}"
        )

    engine.step()
    for name, param in engine.module.named_parameters():
        torch.testing.assert_close(
            param, local(expected[name], param), rtol=1e-5, atol=1e-7, msg=f"stage {stage} weight {name}"
        )

    zero = engine.optimizer
    expert_groups = 0
    for i, group in enumerate(zero.optimizer.param_groups):
        partition = zero.single_partition_of_fp32_groups[i]
        shards = world // EP_SIZE if group.get("moe") else world  # expert-data-parallel vs data-parallel
        expert_groups += bool(group.get("moe"))
        numel = sum(p.numel() for p in zero.bit16_groups[i])
        assert math.ceil(numel / shards) <= partition.numel() < numel / shards + 64, (stage, i, numel, shards)
        state = zero.optimizer.state[partition]
        assert state["exp_avg"].numel() == state["exp_avg_sq"].numel() == partition.numel()
    assert expert_groups == 1


def _worker() -> None:
    from dit_moe.train import engine as engine_lib

    rank, _, world, _ = engine_lib.init_distributed()
    torch.set_num_threads(1)
    for stage in (1, 2):
        _check_stage(stage, rank, world)


@pytest.mark.multiproc
@pytest.mark.parametrize("world", [2, 4])  # 4: two expert-data-parallel ranks share each expert slice
def test_deepspeed_reduces_and_partitions_experts_like_plain_torch(world):
    env = dict(trainer_env(), PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "deepspeed.launcher.runner",
            "--num_gpus",
            str(world),
            "--master_port",
            str(free_port()),
            __file__,
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"


if __name__ == "__main__":
    _worker()
