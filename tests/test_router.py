"""TopKRouter: top-k selection, weights and router losses against hand computations."""

import math

import pytest
import torch

from dit_moe.models.config import MoEArgs
from dit_moe.models.moe import MoEFeedForward
from dit_moe.models.router import TopKRouter


def make_router(E=4, k=2, C=3, norm=False, seed=0):
    torch.manual_seed(seed)
    return TopKRouter(C, E, k, norm_topk_prob=norm)


@pytest.mark.parametrize("norm", [False, True])
def test_topk_and_weights_match_hand_computation(norm):
    router = make_router(norm=norm)
    with torch.no_grad():
        router.weight.copy_(torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1]]))
    x = torch.tensor([[[2.0, 0.5, -1.0], [0.0, 3.0, 1.0]]])  # [N=1, T=2, C=3]
    weights, ids, scores = router(x)
    for t, token in enumerate(x[0].tolist()):
        logits = [token[0], token[1], token[2], sum(token)]
        z = sum(math.exp(v) for v in logits)
        probs = [math.exp(v) / z for v in logits]
        order = sorted(range(4), key=lambda e: -probs[e])[:2]
        expected = [probs[e] for e in order]
        if norm:
            expected = [p / sum(expected) for p in expected]
        assert ids[t].tolist() == order
        assert weights[t].tolist() == pytest.approx(expected, rel=1e-6)
        assert scores[t].tolist() == pytest.approx(probs, rel=1e-6)
    assert weights.dtype == scores.dtype == torch.float32 and ids.shape == (2, 2)


def test_router_computes_in_fp32_for_half_inputs():
    router = make_router().to(torch.bfloat16)
    weights, _, scores = router(torch.randn(2, 5, 3, dtype=torch.bfloat16))
    assert weights.dtype == scores.dtype == torch.float32


def hand_balance_loss_and_logit_grad(ids, scores, N, per_sample):
    """E * sum_e f_e P_e over groups (the whole batch or each sample), and d loss / d logits."""
    M, E = scores.shape
    k = ids.shape[1]
    groups = N if per_sample else 1
    per_group = M // groups
    loss = 0.0
    grad = torch.zeros(M, E, dtype=torch.float64)
    for g in range(groups):
        rows = range(g * per_group, (g + 1) * per_group)
        f = [sum(ids[t].tolist().count(e) for t in rows) / (per_group * k) for e in range(E)]
        P = [sum(scores[t, e].item() for t in rows) / per_group for e in range(E)]
        loss += E * sum(f[e] * P[e] for e in range(E)) / groups
        for t in rows:  # d/dz_{t,j} of E/(G*T_g) * sum_e f_e s_{t,e}, f being a constant
            s = scores[t].double()
            mixed = sum(f[e] * s[e] for e in range(E))
            for j in range(E):
                grad[t, j] = E / (groups * per_group) * s[j] * (f[j] - mixed)
    return loss, grad


@pytest.mark.parametrize("per_sample", [False, True])
def test_load_balancing_loss_value_and_gradient(per_sample):
    N, T, C, E, k, coef = 2, 3, 5, 4, 2, 0.01
    torch.manual_seed(1)
    moe = MoEFeedForward(
        C,
        C,
        MoEArgs(
            num_experts=E, num_experts_per_tok=k, n_shared_experts=0, aux_loss_coef=coef, aux_loss_per_sample=per_sample
        ),
    ).train()
    x = torch.randn(N, T, C)
    _, aux = moe(x)
    assert set(aux) == {"moe_aux_loss"}
    aux["moe_aux_loss"].backward()
    _, ids, scores = moe.gate(x)
    loss, dlogits = hand_balance_loss_and_logit_grad(ids, scores.detach(), N, per_sample)
    assert aux["moe_aux_loss"].item() == pytest.approx(coef * loss, rel=1e-5)
    expected_grad = coef * dlogits.T @ x.reshape(-1, C).double()  # logits = x W^T
    torch.testing.assert_close(moe.gate.weight.grad.double(), expected_grad, rtol=1e-4, atol=1e-9)


def test_per_sample_and_global_loss_differ_when_samples_differ():
    torch.manual_seed(2)
    router = make_router(E=4, k=1, C=3)
    x = torch.randn(2, 6, 3)
    _, ids, scores = router(x)
    global_loss = router.load_balancing_loss(ids, scores, 2, per_sample=False)
    per_sample = router.load_balancing_loss(ids, scores, 2, per_sample=True)
    assert not torch.isclose(global_loss, per_sample)


def test_z_loss_value_and_gradient():
    torch.manual_seed(3)
    C, coef = 4, 1e-3
    moe = MoEFeedForward(
        C, C, MoEArgs(num_experts=3, num_experts_per_tok=1, n_shared_experts=0, aux_loss_coef=0.0, z_loss_coef=coef)
    ).train()
    x = torch.randn(2, 3, C)
    _, aux = moe(x)
    assert set(aux) == {"moe_z_loss"}
    aux["moe_z_loss"].backward()
    tokens = x.reshape(-1, C).double()
    logits = tokens @ moe.gate.weight.detach().double().T
    lse = torch.tensor([math.log(sum(math.exp(v) for v in row)) for row in logits.tolist()], dtype=torch.float64)
    assert aux["moe_z_loss"].item() == pytest.approx(coef * (lse**2).mean().item(), rel=1e-5)
    dlogits = coef * 2 * lse[:, None] * logits.softmax(-1) / tokens.shape[0]  # d lse^2 / dz = 2 lse softmax(z)
    torch.testing.assert_close(moe.gate.weight.grad.double(), dlogits.T @ tokens, rtol=1e-4, atol=1e-9)


def test_no_aux_losses_in_eval_or_with_zero_coefficients():
    moe = MoEFeedForward(4, 4, MoEArgs(num_experts=2, num_experts_per_tok=1, z_loss_coef=0.1))
    x = torch.randn(1, 3, 4)
    assert set(moe.train()(x)[1]) == {"moe_aux_loss", "moe_z_loss"}
    assert moe.eval()(x)[1] == {}
    off = MoEFeedForward(4, 4, MoEArgs(num_experts=2, num_experts_per_tok=1, aux_loss_coef=0.0))
    assert off.train()(x)[1] == {}


def test_gate_init_matches_dit_moe():
    router = make_router(E=8, C=64)
    bound = 1 / math.sqrt(64)  # kaiming_uniform(a=sqrt(5)) on fan_in 64
    assert router.weight.abs().max() <= bound and router.weight.abs().max() > 0.9 * bound
