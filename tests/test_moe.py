"""MoEFeedForward: dispatch/combine against naive loops, grouped vs loop, capacity, gradients,
dense equivalence, gradient checkpointing, and feizc/DiT-MoE checkpoint compatibility."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from dit_moe.models.config import MoEArgs
from dit_moe.models.experts import GroupedExperts, stack_expert_state_dict, unstack_expert_state_dict
from dit_moe.models.moe import MoEFeedForward, moe_load_stats

C = 16  # hidden width: multiple of 8 so the grouped GEMM's 16-byte alignment holds in bf16


def build(seed=0, **overrides):
    torch.manual_seed(seed)
    args = dict(num_experts=4, num_experts_per_tok=2, mlp_ratio=2.0, n_shared_experts=1)
    args.update(overrides)
    intermediate = int(args.pop("mlp_ratio") * C)
    return MoEFeedForward(C, intermediate, MoEArgs(**args))


def expert_fn(experts, e):
    """Expert e as a plain function of one token, straight from the stacked weights."""
    if experts.expert_type == "swiglu":
        return lambda v: experts.down_proj[e] @ (F.silu(experts.gate_proj[e] @ v) * (experts.up_proj[e] @ v))
    return lambda v: (
        experts.fc2_weight[e] @ F.gelu(experts.fc1_weight[e] @ v + experts.fc1_bias[e], approximate="tanh")
        + experts.fc2_bias[e]
    )


def naive(moe, x, keep=None):
    """For each token: sum_j w_j * expert_{e_j}(x) (+ shared(x)); `keep(t, j)` drops copies."""
    weights, ids, _ = moe.gate(x)
    tokens = x.reshape(-1, x.shape[-1])
    rows = []
    for t, v in enumerate(tokens):
        y = torch.zeros_like(v)
        for j in range(ids.shape[1]):
            if keep is None or keep(t, j):
                y = y + weights[t, j] * expert_fn(moe.experts, ids[t, j].item())(v)
        if moe.shared_experts is not None:
            y = y + moe.shared_experts(v)
        rows.append(y)
    return torch.stack(rows).reshape(x.shape)


@pytest.mark.parametrize("expert_type", ["swiglu", "gelu"])
@pytest.mark.parametrize("k", [1, 2])
def test_dropless_dispatch_equals_per_token_loop(expert_type, k):
    moe = build(expert_type=expert_type, num_experts_per_tok=k, grouped_gemm="off")
    if expert_type == "gelu":
        with torch.no_grad():
            moe.experts.fc1_bias.normal_()
            moe.experts.fc2_bias.normal_()
    x = torch.randn(2, 5, C)
    y, _ = moe(x)
    torch.testing.assert_close(y, naive(moe, x), rtol=1e-5, atol=1e-6)


def test_train_and_eval_give_the_same_output():
    moe = build()
    x = torch.randn(2, 5, C)
    torch.testing.assert_close(moe.train()(x)[0], moe.eval()(x)[0], rtol=0, atol=0)


def grads_of(moe, x, g):
    moe.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    y, aux = moe(x)
    ((y * g).sum() + sum(aux.values())).backward()  # random cotangent: _grouped_mm's backward needs a dense grad
    return y.detach(), x.grad, {n: p.grad.clone() for n, p in moe.named_parameters()}


@pytest.mark.parametrize("expert_type", ["swiglu", "gelu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_gemm_equals_loop(expert_type, dtype):
    """torch._grouped_mm runs on CPU in this torch, so the fast path is checked against the loop here."""
    moe = build(expert_type=expert_type).to(dtype)
    x = torch.randn(3, 6, C, dtype=dtype)
    g = torch.randn_like(x)
    moe.experts.grouped_gemm = "off"
    y_loop, dx_loop, grads_loop = grads_of(moe, x, g)
    moe.experts.grouped_gemm = "on"
    assert moe.experts.use_grouped(dtype, x.device)
    y_grp, dx_grp, grads_grp = grads_of(moe, x, g)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(y_grp, y_loop, **tol)
    torch.testing.assert_close(dx_grp, dx_loop, **tol)
    for name in grads_loop:
        torch.testing.assert_close(grads_grp[name], grads_loop[name], **tol, msg=name)


def test_grouped_gemm_follows_autocast():
    """_grouped_mm is not autocast-aware: the experts cast to the autocast dtype themselves."""
    experts = GroupedExperts(4, C, 32)
    x, counts = torch.randn(7, C), torch.tensor([2, 0, 4, 1])
    outputs = {}
    for mode in ("off", "on"):
        experts.grouped_gemm = mode
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outputs[mode] = experts(x, counts)
        assert outputs[mode].dtype == torch.bfloat16, mode
    torch.testing.assert_close(outputs["on"], outputs["off"], rtol=2e-2, atol=2e-2)


def test_router_output_is_visible_to_a_forward_hook():
    moe = build()
    seen = []
    handle = moe.gate.register_forward_hook(lambda module, inputs, output: seen.append(output))
    x = torch.randn(2, 5, C)
    moe(x)
    handle.remove()
    weights, ids, scores = seen[0]
    assert weights.shape == ids.shape == (10, 2) and scores.shape == (10, 4)
    torch.testing.assert_close(weights, scores.gather(1, ids))
    assert torch.equal(torch.bincount(ids.reshape(-1), minlength=4), moe.tokens_per_expert)


def test_grouped_layer_backward_accepts_a_broadcast_gradient():
    """`y.sum().backward()` hands a stride-0 gradient on; combine's weighting must densify it
    before it reaches _grouped_mm, whose backward rejects stride-0 operands."""
    moe = build(grouped_gemm="on")
    moe(torch.randn(1, 3, C))[0].sum().backward()
    assert moe.experts.gate_proj.grad is not None


def test_auto_picks_grouped_only_for_cuda_half_precision():
    experts = build(grouped_gemm="auto").experts
    assert not experts.use_grouped(torch.float32, torch.device("cpu"))
    assert not experts.use_grouped(torch.bfloat16, torch.device("cpu"))
    assert experts.use_grouped(torch.bfloat16, torch.device("cuda")) == hasattr(torch, "_grouped_mm")


def test_capacity_drops_later_tokens_of_overloaded_experts():
    moe = build(num_experts=4, num_experts_per_tok=2, capacity_factor=0.5)
    x = torch.randn(2, 6, C)
    M, k, E = 12, 2, 4
    capacity = math.ceil(0.5 * k * M / E)
    assert moe.capacity(M) == capacity == 3
    _, ids, _ = moe.gate(x)
    seen = [0] * E
    kept = set()
    for t in range(M):  # first copies in token order win
        for j in range(k):
            e = ids[t, j].item()
            if seen[e] < capacity:
                kept.add((t, j))
            seen[e] += 1
    assert len(kept) < M * k, "the routing must overload some expert for this test to mean anything"
    y, _ = moe(x)
    torch.testing.assert_close(y, naive(moe, x, keep=lambda t, j: (t, j) in kept), rtol=1e-5, atol=1e-6)
    assert moe.tokens_per_expert.tolist() == seen  # routed, before dropping


@pytest.mark.parametrize("grouped", ["off", "on"])
def test_experts_without_tokens_get_zero_gradients(grouped):
    experts = GroupedExperts(4, C, 32, grouped_gemm=grouped)
    x = torch.randn(5, C)
    experts(x, torch.tensor([3, 0, 2, 0])).mul(torch.randn(5, C)).sum().backward()
    for name in experts.weight_names:
        grad = getattr(experts, name).grad
        assert grad is not None and torch.all(grad[1] == 0) and torch.all(grad[3] == 0), name
        assert grad[0].abs().sum() > 0 and grad[2].abs().sum() > 0, name

    experts.zero_grad(set_to_none=True)  # an expert-parallel rank whose local experts get no token at all
    experts(torch.randn(0, C), torch.zeros(2, dtype=torch.int64), first_expert=2).mul(
        torch.randn(0, C)
    ).sum().backward()
    for name in experts.weight_names:
        assert torch.equal(getattr(experts, name).grad, torch.zeros_like(getattr(experts, name))), name


def test_one_expert_gelu_moe_equals_dense_mlp():
    torch.manual_seed(4)
    dense = torch.nn.Sequential(torch.nn.Linear(C, 4 * C), torch.nn.GELU(approximate="tanh"), torch.nn.Linear(4 * C, C))
    moe = build(num_experts=1, num_experts_per_tok=1, n_shared_experts=0, expert_type="gelu", mlp_ratio=4.0)
    state = {"gate.weight": moe.gate.weight.detach().clone()}
    for name, value in {"fc1": dense[0], "fc2": dense[2]}.items():
        state[f"experts.0.{name}.weight"] = value.weight.detach().clone()
        state[f"experts.0.{name}.bias"] = value.bias.detach().clone()
    moe.load_state_dict(state)  # per-expert keys stack through the pre-hook
    x = torch.randn(2, 7, C)
    assert torch.equal(moe(x)[0], dense(x))


def test_gradient_checkpointing_gives_the_same_gradients_including_aux():
    moe = build(z_loss_coef=1e-2, aux_loss_per_sample=True).train()
    x = torch.randn(2, 5, C)

    def step(use_checkpoint):
        moe.zero_grad(set_to_none=True)
        inp = x.clone().requires_grad_()
        y, aux = checkpoint(moe, inp, use_reentrant=False) if use_checkpoint else moe(inp)
        (y.square().sum() + 100 * sum(aux.values())).backward()
        return inp.grad, {n: p.grad.clone() for n, p in moe.named_parameters()}

    dx_plain, plain = step(False)
    dx_ckpt, ckpt = step(True)
    torch.testing.assert_close(dx_ckpt, dx_plain, rtol=0, atol=0)
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=0, atol=0, msg=name)
    moe.zero_grad(set_to_none=True)  # and the aux gradient reaches the router exactly once
    _, aux = checkpoint(moe, x, use_reentrant=False)
    sum(aux.values()).backward()
    aux_only = moe.gate.weight.grad.clone()
    moe.zero_grad(set_to_none=True)
    sum(moe(x)[1].values()).backward()
    torch.testing.assert_close(aux_only, moe.gate.weight.grad, rtol=0, atol=0)


def test_load_stats_and_token_counts():
    moe = build(num_experts=4, num_experts_per_tok=2)
    x = torch.randn(2, 5, C)
    moe(x)
    _, ids, _ = moe.gate(x)
    expected = torch.bincount(ids.reshape(-1), minlength=4).float()
    assert torch.equal(moe.tokens_per_expert.float(), expected)
    assert moe.to(torch.bfloat16).tokens_per_expert.dtype == torch.int64  # half-precision casts cannot round counts
    assert "tokens_per_expert" not in moe.state_dict()
    stats = moe_load_stats(torch.nn.ModuleDict({"block": moe}))
    assert torch.equal(stats["block"]["tokens_per_expert"], expected)
    cv = expected.std(unbiased=False) / expected.mean()
    torch.testing.assert_close(stats["block"]["cv"], cv)


# --- feizc/DiT-MoE compatibility ------------------------------------------------------------


def feizc_state_dict(E, C, I, shared_width, seed=5):
    """A state dict in feizc/DiT-MoE's SparseMoeBlock layout (per-expert nn.Linear keys)."""
    g = torch.Generator().manual_seed(seed)
    sd = {"gate.weight": torch.randn(E, C, generator=g)}
    for e in range(E):
        sd[f"experts.{e}.gate_proj.weight"] = torch.randn(I, C, generator=g) / math.sqrt(C)
        sd[f"experts.{e}.up_proj.weight"] = torch.randn(I, C, generator=g) / math.sqrt(C)
        sd[f"experts.{e}.down_proj.weight"] = torch.randn(C, I, generator=g) / math.sqrt(I)
    sd["shared_experts.gate_proj.weight"] = torch.randn(shared_width, C, generator=g) / math.sqrt(C)
    sd["shared_experts.up_proj.weight"] = torch.randn(shared_width, C, generator=g) / math.sqrt(C)
    sd["shared_experts.down_proj.weight"] = torch.randn(C, shared_width, generator=g) / math.sqrt(shared_width)
    return sd


def feizc_sparse_moe_block(sd, x, k, alpha=0.01):
    """feizc/DiT-MoE SparseMoeBlock (training path) and its MoEGate aux loss, from their formulas."""

    def mlp(prefix, v):
        return F.linear(
            F.silu(F.linear(v, sd[prefix + "gate_proj.weight"])) * F.linear(v, sd[prefix + "up_proj.weight"]),
            sd[prefix + "down_proj.weight"],
        )

    E = sd["gate.weight"].shape[0]
    h = x.reshape(-1, x.shape[-1])
    scores = F.linear(h, sd["gate.weight"]).softmax(dim=-1)
    topk_weight, topk_idx = torch.topk(scores, k=k, dim=-1, sorted=False)  # not renormalised
    flat_idx = topk_idx.reshape(-1)
    rep = h.repeat_interleave(k, dim=0)
    y = torch.empty_like(rep)
    for i in range(E):
        y[flat_idx == i] = mlp(f"experts.{i}.", rep[flat_idx == i])
    y = (y.view(*topk_weight.shape, -1) * topk_weight.unsqueeze(-1)).sum(dim=1)
    aux = (scores.mean(0) * F.one_hot(flat_idx, num_classes=E).float().mean(0) * E).sum() * alpha
    return y.view(x.shape) + mlp("shared_experts.", x), aux


def test_feizc_state_dict_loads_and_matches_reference_block():
    E, k, I = 4, 2, 2 * C
    sd = feizc_state_dict(E, C, I, shared_width=2 * C)
    moe = build(num_experts=E, num_experts_per_tok=k, mlp_ratio=2.0, n_shared_experts=2).train()
    moe.load_state_dict(sd, strict=True)
    x = torch.randn(2, 6, C)
    y, aux = moe(x)
    y_ref, aux_ref = feizc_sparse_moe_block(sd, x, k)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(aux["moe_aux_loss"], aux_ref, rtol=1e-6, atol=1e-8)


def test_state_dict_round_trip_between_layouts():
    sd = {f"blocks.1.moe.{key}": value for key, value in feizc_state_dict(4, C, 2 * C, 2 * C).items()}
    sd["blocks.1.attn.qkv.weight"] = torch.randn(3 * C, C)
    stacked = stack_expert_state_dict(sd)
    assert stacked["blocks.1.moe.experts.gate_proj"].shape == (4, 2 * C, C)
    assert stacked["blocks.1.moe.experts.down_proj"].shape == (4, C, 2 * C)
    assert (
        "blocks.1.moe.shared_experts.gate_proj.weight" in stacked
        and "blocks.1.moe.experts.0.up_proj.weight" not in stacked
    )
    back = unstack_expert_state_dict(stacked)
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[key], sd[key]) for key in sd)

    moe = build(num_experts=4, mlp_ratio=2.0, n_shared_experts=2, expert_type="gelu")
    exported = unstack_expert_state_dict(moe.state_dict())
    assert "experts.3.fc2.bias" in exported and "experts.fc2_bias" not in exported
    fresh = build(seed=9, num_experts=4, mlp_ratio=2.0, n_shared_experts=2, expert_type="gelu")
    fresh.load_state_dict(exported, strict=True)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), moe.state_dict().values()))


def test_expert_init_is_per_expert_xavier():
    experts = GroupedExperts(2, 64, 256, expert_type="gelu")
    bound = math.sqrt(6 / (64 + 256))
    for e in range(2):
        w = experts.fc1_weight[e]
        assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    assert torch.all(experts.fc1_bias == 0) and torch.all(experts.fc2_bias == 0)
