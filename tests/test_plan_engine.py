"""The planner's model-state bytes against real DeepSpeed engines on CPU ranks, counted from the engine's tensors.

One launch per world size runs every (ZeRO stage, --ep-size) the trainer allows in one process group:
each rank builds the tiny MoE DiT, wraps it as the trainer does (`setup_expert_parallel`, `initialize`),
runs one micro-batch and, at the moment the second optimizer step runs (the peak: fp32 gradient copy, reduced
gradients, buckets and optimizer state all alive), adds up the bytes of every distinct tensor storage the
engine holds. Rank 0 writes the figures; the test compares them with `dit_moe.plan.memory`, less the buffers
that live during the forward and backward only (reduce buckets, ZeRO-3's gathered layer), freed by then.
The file is also the worker (the deepspeed launcher runs it).
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from dit_moe.models import preset_config

from trainer_runs import REPO, free_port
from trainer_runs import env as trainer_env

CONFIGS = [(1, 1), (2, 1), (3, 1), (1, 2), (2, 2)]  # (ZeRO stage, ep size); ZeRO-3 runs no expert parallelism
MICRO = 2
ZERO_SETTINGS = {
    "reduce_bucket_size": 300_000,
    "allgather_bucket_size": 300_000,
    "overlap_comm": False,
    "contiguous_gradients": True,
    "stage3_prefetch_bucket_size": 100_000,
    "stage3_param_persistence_threshold": 1_000,
}


def model_config():
    return preset_config("DiT-T/2", input_size=8, in_channels=4, num_classes=10, num_experts=4, num_experts_per_tok=2)


def _ds_config(stage: int, world: int) -> dict:
    return {
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": 1,
        "train_batch_size": MICRO * world,
        "steps_per_print": 10**9,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.0}},
        "zero_optimization": {"stage": stage, **ZERO_SETTINGS},
    }


def _storages(root, depth: int = 0, seen=None) -> dict:
    """data_ptr -> bytes of every tensor storage reachable from `root` through DeepSpeed's own objects."""
    seen = {} if seen is None else seen
    if isinstance(root, torch.Tensor):
        if root.device.type != "meta" and root.numel():
            seen[root.untyped_storage().data_ptr()] = root.untyped_storage().nbytes()
            if root.grad is not None:
                _storages(root.grad, depth, seen)
        return seen
    if depth > 4:
        return seen
    if isinstance(root, dict):
        items = list(root.keys()) + list(root.values())
    elif isinstance(root, (list, tuple, set)):
        items = list(root)
    elif type(root).__module__.startswith(("deepspeed", "torch.optim")) and hasattr(root, "__dict__"):
        items = [v for k, v in vars(root).items() if k not in ("module", "_modules")]
    else:
        return seen
    for item in items:
        _storages(item, depth + 1, seen)
    return seen


def _measure(stage: int, ep_size: int, world: int) -> int:
    from dit_moe.models import DiT
    from dit_moe.train import engine as engine_lib

    torch.manual_seed(0)
    model = DiT(model_config()).train()
    ep = engine_lib.setup_expert_parallel(model, ep_size)
    engine = engine_lib.initialize(model, _ds_config(stage, world), ep)
    peak = {}

    def counting_step(*args, _step=engine.optimizer.optimizer.step, **kwargs):
        found = _storages(engine.optimizer)
        for param in engine.module.parameters():
            _storages(param, 0, found)
            _storages(getattr(param, "ds_tensor", None), 0, found)
        peak["bytes"] = max(peak.get("bytes", 0), sum(found.values()))
        return _step(*args, **kwargs)

    engine.optimizer.optimizer.step = counting_step
    x, t, y = torch.randn(MICRO, 4, 8, 8), torch.randint(0, 1000, (MICRO,)), torch.randint(0, 10, (MICRO,))
    for _ in range(2):  # Adam's moments exist from the first step on: the second is the peak
        engine.backward(engine(x, t, y).square().mean())
        engine.step()
    return peak["bytes"]


def _worker(out: str) -> None:
    from dit_moe.train import engine as engine_lib

    rank, _, world, _ = engine_lib.init_distributed()
    torch.set_num_threads(1)
    results = {f"{stage},{ep}": _measure(stage, ep, world) for stage, ep in CONFIGS}
    if rank == 0:
        with open(out, "w") as f:
            json.dump(results, f)


@pytest.mark.multiproc
@pytest.mark.parametrize("world", [2, 4])
def test_model_state_bytes_match_real_engines(world, tmp_path):
    from dit_moe.plan.cluster import ZERO_DEFAULTS, ClusterSpec
    from dit_moe.plan.memory import in_flight_buffer_bytes, model_state_bytes
    from dit_moe.plan.params import count_parameters

    out = tmp_path / "measured.json"
    env = dict(trainer_env(), PYTHONPATH=str(REPO), PLAN_ENGINE_OUT=str(out))
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(world)]
    cmd += ["--master_port", str(free_port()), __file__]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    measured = json.loads(out.read_text())
    settings = {**ZERO_DEFAULTS, **ZERO_SETTINGS}
    counts = count_parameters(model_config(), settings["stage3_param_persistence_threshold"])
    wrong = {}
    for stage, ep in CONFIGS:
        cluster = ClusterSpec(
            nodes=1, gpus_per_node=world, zero=stage, ep_size=ep, precision="fp32", ema=False, zero_settings=settings
        )
        planned = model_state_bytes(counts, cluster)
        at_step = sum(planned.values()) - in_flight_buffer_bytes(cluster, counts)  # freed before the step runs
        got = measured[f"{stage},{ep}"]
        if abs(at_step - got) > 0.05 * got:
            wrong[f"ZeRO-{stage} ep {ep}"] = (got, at_step, planned)
    assert not wrong, f"measured, planned, planned parts: {wrong}"


if __name__ == "__main__":
    _worker(os.environ["PLAN_ENGINE_OUT"])
