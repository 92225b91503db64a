"""The routers beside top-k against hand computations: selection, weights, capacity, the
expert-choice inference threshold, the sigmoid-bias update and its sync; fine-grained and shared
expert widths; the dispatch of empty slots and the routing statistics of an expert-choice model."""

import math

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from dit_moe.models import DiT, DiT_models
from dit_moe.models.config import MoEArgs
from dit_moe.models.flops import block_ffn_flops
from dit_moe.models.moe import MoEFeedForward, combine, dispatch
from dit_moe.models.router_expert_choice import THRESHOLD_MOMENTUM, ExpertChoiceRouter, UncalibratedRouter
from dit_moe.models.router_sigmoid import SigmoidBiasRouter, update_expert_bias
from dit_moe.routing import RoutingRecorder
from dit_moe.routing.stats import count_routing
from dit_moe.upcycle import UpcycleError, upcycle_moe_args, upcycle_state_dict


def identity_gate(router):
    """Make the router's logits equal its input (hidden = E, weight = I)."""
    with torch.no_grad():
        router.weight.copy_(torch.eye(router.num_experts))
    return router


# Logits of 4 tokens over 2 experts.
LOGITS = torch.tensor([[2.0, 0.0], [1.0, 0.5], [0.0, 1.0], [0.3, 0.2]])


def test_expert_choice_takes_each_experts_top_capacity_tokens():
    router = identity_gate(ExpertChoiceRouter(2, 2, top_k=1))  # C = ceil(1 * 4 * 1 / 2) = 2
    assert router.capacity(4) == 2 and router.slots == 2
    weights, ids, scores = router(LOGITS)
    s = LOGITS.softmax(dim=-1)
    # expert 0's scores: .881 .622 .269 .525 -> tokens 0, 1; expert 1's: .119 .378 .731 .475 -> tokens 2, 3
    torch.testing.assert_close(scores, s)
    assert ids.tolist() == [[0, 2], [0, 2], [2, 1], [2, 1]]  # 2 = empty slot
    expected = torch.tensor([[s[0, 0], 0], [s[1, 0], 0], [0, s[2, 1]], [0, s[3, 1]]])
    torch.testing.assert_close(weights, expected)


def test_expert_choice_capacity_factor_lets_a_token_reach_several_experts():
    router = identity_gate(ExpertChoiceRouter(2, 2, top_k=1, capacity_factor=1.5))  # C = ceil(1.5 * 2) = 3
    assert router.capacity(4) == 3 and router.capacity(1) == 1  # never more than the tokens
    _, ids, _ = router(LOGITS)
    # expert 0: tokens 0, 1, 3; expert 1: tokens 2, 3, 1 -> token 1 and 3 reach both, none is left out
    assert ids.tolist() == [[0, 2], [0, 1], [2, 1], [0, 1]]


def test_expert_choice_calibrates_a_batch_independent_threshold():
    router = identity_gate(ExpertChoiceRouter(2, 2, top_k=1))
    router(LOGITS)
    s = LOGITS.softmax(dim=-1)
    last_accepted = torch.tensor([s[1, 0], s[3, 1]])  # the C-th (2nd) largest score of each expert: .622, .475
    torch.testing.assert_close(router.threshold, (1 - THRESHOLD_MOMENTUM) * last_accepted)
    torch.testing.assert_close(router.threshold / router.threshold_norm, last_accepted)  # debiased
    second = LOGITS.flip(0) * 2
    router(second)
    m = THRESHOLD_MOMENTUM
    s2 = second.softmax(dim=-1)
    tau = (m * (1 - m) * last_accepted + (1 - m) * s2.topk(2, dim=0).values[-1]) / (1 - m**2)
    torch.testing.assert_close(router.threshold / router.threshold_norm, tau)
    router.eval()
    weights, ids, _ = router(LOGITS)
    chosen = s >= tau
    assert torch.equal(ids, torch.where(chosen, torch.arange(2), 2))
    torch.testing.assert_close(weights, s * chosen)
    # One token routes the same alone as within the batch.
    for t in range(4):
        assert torch.equal(router(LOGITS[t : t + 1])[1], ids[t : t + 1])


def test_uncalibrated_expert_choice_refuses_eval_mode_and_a_loaded_calibration_is_noted():
    router = identity_gate(ExpertChoiceRouter(2, 2, top_k=1)).eval()
    with pytest.raises(UncalibratedRouter, match="would depend on the batch"):
        router(LOGITS)  # routing over the batch would tie each sample to the others
    assert router.threshold_norm == 0  # eval forwards do not calibrate
    trained = identity_gate(ExpertChoiceRouter(2, 2, top_k=1))
    trained(LOGITS)
    router.load_state_dict(trained.state_dict())
    assert router.calibrated and torch.equal(router(LOGITS)[1], trained.eval()(LOGITS)[1])


def test_dispatch_drops_empty_slots_and_combine_inverts_it():
    x = torch.arange(8.0).reshape(4, 2)
    ids = torch.tensor([[0, 2], [0, 1], [2, 1], [2, 2]])  # E = 2, id 2 = empty
    weights = torch.tensor([[0.5, 0.0], [0.25, 0.75], [0.0, 1.0], [0.0, 0.0]])
    buffer, meta = dispatch(x, ids, 2, empty_slots=True)
    assert meta.token_indices.tolist() == [0, 1, 1, 2] and meta.counts.tolist() == [2, 2]
    assert meta.routed_counts.tolist() == [2, 2]
    torch.testing.assert_close(buffer, x[[0, 1, 1, 2]])
    out = combine(buffer * 10, weights, meta)
    torch.testing.assert_close(out, torch.stack([5 * x[0], 10 * x[1], 10 * x[2], torch.zeros(2)]))


def test_expert_choice_moe_layer_matches_a_loop_over_experts():
    torch.manual_seed(0)
    args = MoEArgs(num_experts=4, num_experts_per_tok=2, router="expert-choice", n_shared_experts=0)
    moe = MoEFeedForward(8, 16, args)
    x = torch.randn(2, 5, 8)
    y, aux = moe(x)
    assert aux == {}  # no balancing loss: every expert is full
    weights, ids, _ = moe.gate(x)
    tokens = x.reshape(10, 8)
    expected = torch.zeros(10, 8)
    one_row = torch.ones(1, dtype=torch.int64)
    for e in range(4):
        for t in range(10):
            if ids[t, e] == e:
                expected[t] += weights[t, e] * moe.experts(tokens[t : t + 1], one_row, first_expert=e)[0]
    torch.testing.assert_close(y.reshape(10, 8), expected)
    assert moe.tokens_per_expert.tolist() == [5, 5, 5, 5]  # C = ceil(10 * 2 / 4)


def test_sigmoid_bias_selects_with_the_bias_and_weights_without_it():
    router = identity_gate(SigmoidBiasRouter(3, 3, top_k=2))
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 2.0]])
    with torch.no_grad():
        router.expert_bias.copy_(torch.tensor([0.0, -1.0, 0.0]))
    weights, ids, scores = router(logits)
    s = logits.sigmoid()
    torch.testing.assert_close(scores, s)
    # token 0: s + b = .881 -.269 .5 -> experts 0, 2 (expert 1 has the 2nd score but the bias pushes it out)
    assert ids.tolist() == [[0, 2], [2, 0]]
    torch.testing.assert_close(weights[0], torch.stack([s[0, 0], s[0, 2]]) / (s[0, 0] + s[0, 2]))
    torch.testing.assert_close(weights[1], torch.stack([s[1, 2], s[1, 0]]) / (s[1, 2] + s[1, 0]))
    assert router.step_load.tolist() == [2, 0, 2]  # counted in training mode only
    router.eval()
    router(logits)
    assert router.step_load.tolist() == [2, 0, 2]


def test_bias_update_is_the_sign_of_the_load_gap_over_all_ranks():
    torch.manual_seed(0)
    model = DiT_models["DiT-T/2"](input_size=4, in_channels=1, num_classes=3, num_experts=3, router="sigmoid-bias")
    routers = [m for m in model.modules() if isinstance(m, SigmoidBiasRouter)]
    for i, router in enumerate(routers):
        router.step_load.copy_(torch.tensor([4.0, 1.0, 1.0 + i % 2]))
    other_rank = torch.tensor([[0.0, 3.0, 1.0]] * len(routers))  # what a second rank counted

    def all_reduce(loads):
        loads.add_(other_rank)

    assert update_expert_bias(model, all_reduce)
    u = model.config.moe.bias_update_rate
    # global loads [4, 4, 2] (mean 10/3) or [4, 4, 3] (mean 11/3): signs [-1, -1, +1] in every layer
    for router in routers:
        torch.testing.assert_close(router.expert_bias, torch.tensor([-u, -u, u]))
        assert router.step_load.sum() == 0
    assert not update_expert_bias(DiT_models["DiT-T/2"](input_size=4, in_channels=1, num_classes=3, num_experts=3))


def test_router_state_stays_fp32_saves_and_loads_from_files_without_it():
    kw = dict(input_size=4, in_channels=1, num_classes=3, num_experts=3)
    model = DiT_models["DiT-T/2"](**kw, router="sigmoid-bias").bfloat16()
    gate = model.blocks[0].moe.gate
    assert gate.expert_bias.dtype == torch.float32 and gate.step_load.dtype == torch.float32
    gate.expert_bias.add_(1e-3)
    assert gate.expert_bias[0].item() == pytest.approx(1e-3)  # bf16 would round 1 + 1e-3 steps away
    assert "blocks.0.moe.gate.expert_bias" in model.state_dict()
    assert "blocks.0.moe.gate.step_load" not in model.state_dict()
    topk_state = DiT_models["DiT-T/2"](**kw).state_dict()
    for router in ("sigmoid-bias", "expert-choice"):
        fresh = DiT_models["DiT-T/2"](**kw, router=router)
        state = [b for n, b in fresh.state_dict().items() if n not in topk_state]
        assert state and all(b.fill_(1.0).sum() > 0 for b in state)
        fresh.load_state_dict(topk_state, strict=True)  # raises on a missing key: the pre-hook fills in zeros
        assert all(b.abs().sum() == 0 for b in state)


def test_fine_grained_experts_keep_the_activated_width():
    coarse = MoEFeedForward(16, 64, MoEArgs(num_experts=4, num_experts_per_tok=2, n_shared_experts=0))
    fine = MoEFeedForward(
        16, 64, MoEArgs(num_experts=16, num_experts_per_tok=8, expert_width_ratio=0.25, num_shared_experts=2)
    )
    assert coarse.experts.gate_proj.shape == (4, 64, 16) and fine.experts.gate_proj.shape == (16, 16, 16)
    x = torch.randn(2, 3, 16)
    for layer in (coarse, fine):  # the FLOP accounting reads the widths the layer was built with
        with FlopCounterMode(display=False) as counter:
            layer(x)
        assert counter.get_total_flops() == sum(block_ffn_flops(16, 64, layer.args, 6).values())
    routed = [block_ffn_flops(16, 64, layer.args, 6)["experts"] for layer in (coarse, fine)]
    assert routed[0] == routed[1]  # the same activated routed width: 2 x 64 = 8 x 16
    assert fine.shared_experts.gate_proj.weight.shape == (2 * 16, 16)  # two shared experts of routed width
    dit_moe = MoEFeedForward(16, 64, MoEArgs())  # DiT-MoE's layout: one shared expert of width 2 * hidden
    assert dit_moe.shared_experts.gate_proj.weight.shape == (32, 16)
    assert MoEFeedForward(16, 64, MoEArgs(num_shared_experts=0)).shared_experts is None
    y, _ = fine(torch.randn(2, 3, 16))
    assert y.shape == (2, 3, 16)


@pytest.mark.parametrize(
    "bad", [dict(router="race"), dict(expert_width_ratio=0.0), dict(num_shared_experts=-1), dict(bias_update_rate=-1)]
)
def test_bad_router_options_fail_in_one_sentence(bad):
    with pytest.raises(ValueError, match="must"):
        MoEArgs(**bad)


def test_expert_choice_routing_statistics_count_only_taken_slots():
    torch.manual_seed(0)
    model = DiT_models["DiT-T/2"](input_size=4, in_channels=1, num_classes=3, num_experts=4, router="expert-choice")
    model.train()  # the training rule: every expert takes exactly C tokens
    x, t, y = torch.randn(3, 1, 4, 4), torch.rand(3) * 999, torch.tensor([0, 1, 2])
    with RoutingRecorder(model) as rec:
        model(x, t, y)
    arrays, meta = rec.arrays(), rec.metadata()
    assert meta["top_k"] == 4 and meta["empty_slots"] and arrays["ids"].shape == (12, len(model.moe_blocks), 4)
    counts = count_routing([arrays], meta)
    C = math.ceil(12 * 2 / 4)
    assert (counts.expert_totals == C).all()  # empty slots (id 4) count for no expert
    np.testing.assert_allclose(counts.by_class.sum(axis=(1, 2)), 12 * 2)


def test_upcycling_into_the_sigmoid_bias_router_starts_at_the_dense_function():
    torch.manual_seed(0)
    dense = DiT_models["DiT-T/2"](input_size=4, in_channels=1, num_classes=3, num_experts=0)
    config, state = upcycle_state_dict(dense.state_dict(), dense.config, upcycle_moe_args(4, 2, router="sigmoid-bias"))
    assert config.moe.router == "sigmoid-bias"
    moe = DiT(config)
    moe.load_state_dict(state, strict=True)
    x, t, y = torch.randn(2, 1, 4, 4), torch.tensor([10.0, 500.0]), torch.tensor([0, 2])
    torch.testing.assert_close(moe.eval()(x, t, y), dense.eval()(x, t, y))
    with pytest.raises(UpcycleError, match="expert choice may leave a token without experts"):
        upcycle_state_dict(dense.state_dict(), dense.config, upcycle_moe_args(4, 2, router="expert-choice"))
