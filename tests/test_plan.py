"""`python -m dit_moe.plan`: its model-state terms against DeepSpeed's own estimators, its command line and JSON."""

import functools
import json

import pytest
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

from dit_moe.models import preset_config
from dit_moe.plan.cli import main
from dit_moe.plan.cluster import ZERO_DEFAULTS, ClusterSpec
from dit_moe.plan.memory import FP32, ema_bytes_per_rank, grads32_bytes, optimizer_bytes, params_bytes
from dit_moe.plan.params import count_parameters

MODELS = {
    "XL/2 8E2A 256px": ("DiT-XL/2", 32, 8),
    "G/2 16E2A 512px": ("DiT-G/2", 64, 16),
    "B/2 dense": ("DiT-B/2", 32, 0),
}


@functools.lru_cache(maxsize=None)
def _counts(name):
    model, latent, experts = MODELS[name]
    return count_parameters(preset_config(model, input_size=latent, num_experts=experts, qk_norm=bool(experts)))


@pytest.mark.parametrize("gpus", [(1, 8), (8, 8)])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_zero2_model_states_match_deepspeeds_estimator(name, gpus):
    """Where the two overlap (no expert parallelism, no offload): 16-bit weights, the fp32 gradient partition,
    master weights and Adam moments. DeepSpeed's estimator also counts a 16-bit gradient partition of 2 bytes
    per parameter / W, which 0.19.8's ZeRO-1/2 no longer keep (they stage 16-bit gradients in the reduce
    buckets, counted as buffers here, and reduce into the fp32 partition: tests/test_plan_engine.py)."""
    counts, (nodes, per_node) = _counts(name), gpus
    cluster = ClusterSpec(nodes=nodes, gpus_per_node=per_node, zero=2)
    _, estimate = estimate_zero2_model_states_mem_needs(counts.trainable, per_node, nodes, cpu_offload=False)
    overlap = estimate - 2 * counts.trainable / cluster.world_size
    mine = params_bytes(counts, cluster) + grads32_bytes(counts, cluster) + optimizer_bytes(counts, cluster)
    assert mine == pytest.approx(overlap, rel=0.05)


@pytest.mark.parametrize("gpus", [(1, 8), (8, 8)])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_zero3_model_states_match_deepspeeds_estimator(name, gpus):
    """Where they overlap: partitioned 16-bit weights, fp32 gradients, master weights and moments (18 bytes
    per parameter / W in DeepSpeed's estimator), not the gathered working set (its 4 x largest layer, the
    planner's buffers) nor the 16-bit reduced-gradient partition 0.19.8's stage 3 also keeps. The estimator
    steps the whole partition at once: so does the planner with a `sub_group_size` above the partition."""
    counts, (nodes, per_node) = _counts(name), gpus
    settings = {**ZERO_DEFAULTS, "sub_group_size": 1e12}
    cluster = ClusterSpec(nodes=nodes, gpus_per_node=per_node, zero=3, zero_settings=settings)
    _, estimate, largest = estimate_zero3_model_states_mem_needs(
        counts.trainable, counts.largest_moe_layer, per_node, nodes, cpu_offload=False, cpu_offload_params=False
    )
    mine = params_bytes(counts, cluster) + grads32_bytes(counts, cluster) + optimizer_bytes(counts, cluster)
    assert mine == pytest.approx(estimate - largest, rel=0.05)


def test_expert_optimizer_state_is_partitioned_over_every_rank_whatever_the_ep_size():
    """DeepSpeed 0.19.8 partitions each expert group over its expert-data-parallel group (W / ep ranks), each of
    which holds 1 / ep of the experts: 1 / W of the expert state per rank (measured: tests/test_plan_engine.py)."""
    counts = _counts("G/2 16E2A 512px")
    sizes = [optimizer_bytes(counts, ClusterSpec(nodes=8, gpus_per_node=8, ep_size=ep)) for ep in (1, 2, 8, 16)]
    assert sizes == [12 * counts.trainable / 64] * 4
    params = [params_bytes(counts, ClusterSpec(nodes=8, gpus_per_node=8, ep_size=ep)) for ep in (1, 8)]
    assert params[0] - params[1] == pytest.approx(2 * counts.expert * (1 - 1 / 8))


def test_ema_term_follows_one_function():
    counts = _counts("XL/2 8E2A 256px")
    cluster = ClusterSpec(zero=2, ep_size=2)
    assert ema_bytes_per_rank(counts, cluster) == FP32 * counts.trainable / cluster.world_size  # the master fragment
    assert ema_bytes_per_rank(counts, ClusterSpec(zero=2, ema=False)) == 0


TINY = ["--model", "DiT-T/2", "--num-experts", "4", "--image-size", "64", "--gpus-per-node", "2", "--gpu-memory", "3"]


def _run(capsys, *args):
    code = main([*TINY, *args, "--json"])
    return code, json.loads(capsys.readouterr().out)


def test_json_holds_the_keys_and_its_numbers_agree(capsys):
    code, plan = _run(capsys, "--micro-batch", "4", "--ep-size", "2")
    assert code == 0
    assert set(plan["per_gpu_gib"]) == {"params", "grads", "optimizer", "ema", "activations", "buffers", "total"}
    for key in ("parameters", "fits", "max_micro_batch", "checkpoint_gib", "all_to_all_bytes_per_step"):
        assert key in plan
    assert set(plan["checkpoint_gib"]) == {"per_rank", "total"} and plan["flops_per_image"]["training"] > 0
    parts = plan["per_gpu_gib"]
    assert parts["total"] == pytest.approx(sum(v for k, v in parts.items() if k != "total"))
    assert plan["fits"] == (parts["total"] <= 3) and plan["all_to_all_bytes_per_step"] > 0
    assert plan["step_time_s"] > 0 and plan["step_time_at_mfu"] == 0.4


def test_max_micro_batch_is_the_largest_that_fits(capsys):
    _, plan = _run(capsys, "--zero", "1")
    largest = plan["max_micro_batch"]
    assert largest > 0
    assert _run(capsys, "--zero", "1", "--micro-batch", str(largest))[1]["fits"]
    assert not _run(capsys, "--zero", "1", "--micro-batch", str(largest + 1))[1]["fits"]


def test_checkpointing_and_masking_lower_the_activations(capsys):
    plain = _run(capsys)[1]["per_gpu_gib"]["activations"]
    assert _run(capsys, "--grad-checkpointing", "true")[1]["per_gpu_gib"]["activations"] < plain / 3
    assert _run(capsys, "--mask-ratio", "0.5")[1]["per_gpu_gib"]["activations"] < 0.6 * plain


def test_sweep_lists_every_runnable_stage_and_ep_size_at_its_largest_micro_batch(capsys):
    assert main([*TINY, "--sweep", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    shapes = [(row["cluster"]["zero"], row["cluster"]["ep_size"]) for row in rows]
    assert shapes == [(1, 1), (1, 2), (2, 1), (2, 2), (3, 1)]
    assert all(row["cluster"]["micro_batch"] == row["max_micro_batch"] and row["fits"] for row in rows)
    assert main([*TINY, "--sweep"]) == 0 and capsys.readouterr().out.count("\n| ") == len(rows) + 1


@pytest.mark.parametrize(
    "args, words",
    [
        (["--model", "DiT-Q/2"], "Unknown --model"),
        (["--ep-size", "3"], "does not divide the 4 experts"),
        (["--ep-size", "4"], "does not divide the 2 GPUs"),
        (["--ep-size", "2", "--zero", "3"], "cannot run --ep-size 2 under ZeRO-3"),
        (["--num-experts", "0", "--ep-size", "2"], "needs an MoE model"),
        (["--image-size", "60"], "not a multiple of 8"),
    ],
)
def test_impossible_inputs_are_refused_in_one_sentence(capsys, args, words):
    with pytest.raises(SystemExit) as stop:
        main([*TINY, *args])
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and words in err and len(err.splitlines()) == 1 and "Traceback" not in err, err
