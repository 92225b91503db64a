"""The SwiGLU expert loop's hand-written backward against autograd through the plain loop."""

import pytest
import torch
import torch.nn.functional as F

from dit_moe.models.expert_loop import SwiGLUExpertLoop
from dit_moe.models.experts import GroupedExperts

E, C, I = 4, 16, 24
SIZES = [5, 0, 7, 3]  # an expert without rows


def plain_loop(x, sizes, gate, up, down):
    """The loop autograd differentiates: split, per-expert SwiGLU, concatenate."""
    outs = [
        F.linear(F.silu(F.linear(rows, gate[e])) * F.linear(rows, up[e]), down[e])
        for e, rows in enumerate(x.split(sizes))
    ]
    return torch.cat(outs)


def inputs(dtype=torch.float64):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(sum(SIZES), C, dtype=dtype, generator=gen)
    weights = [torch.randn(E, I, C, dtype=dtype, generator=gen), torch.randn(E, I, C, dtype=dtype, generator=gen)]
    weights.append(torch.randn(E, C, I, dtype=dtype, generator=gen))
    return x, weights


def test_gradcheck_in_double_precision_with_an_empty_expert():
    x, weights = inputs()
    args = [t.requires_grad_() for t in (x, *weights)]
    assert torch.autograd.gradcheck(lambda x, g, u, d: SwiGLUExpertLoop.apply(x, SIZES, g, u, d), args)


def test_forward_and_gradients_equal_autograd_through_the_plain_loop():
    x, weights = inputs(torch.float32)
    grad_y = torch.randn(sum(SIZES), C, generator=torch.Generator().manual_seed(1))
    results = []
    for fn in (SwiGLUExpertLoop.apply, plain_loop):
        leaves = [t.clone().requires_grad_() for t in (x, *weights)]
        y = fn(leaves[0], SIZES, *leaves[1:])
        y.backward(grad_y)
        results.append((y.detach(), [t.grad for t in leaves]))
    (y_ours, grads_ours), (y_plain, grads_plain) = results
    torch.testing.assert_close(y_ours, y_plain, rtol=0, atol=0)
    for ours, plain in zip(grads_ours, grads_plain):
        torch.testing.assert_close(ours, plain, rtol=1e-5, atol=1e-5)
    assert all(g[1].abs().sum() == 0 for g in grads_ours[1:])  # the empty expert's gradients are zeros
    assert all(g.is_contiguous() for g in grads_ours)


@pytest.mark.parametrize("local", [4, 2])
def test_experts_module_gradients_accumulate_and_slice_for_expert_parallel_ranks(local):
    """Through GroupedExperts: two backwards accumulate, and a local slice (expert parallelism) gets its rows."""
    torch.manual_seed(0)
    experts = GroupedExperts(E, C, I, grouped_gemm="off")
    counts = torch.tensor(SIZES[:local] if local == E else [4, 6])
    x = torch.randn(int(counts.sum()), C)
    first = 0 if local == E else 2
    for _ in range(2):
        experts(x, counts, first_expert=first).square().sum().backward()
    ours = {n: p.grad.clone() for n, p in experts.named_parameters()}
    experts.zero_grad(set_to_none=True)
    sliced = [getattr(experts, n)[first : first + local] for n in ("gate_proj", "up_proj", "down_proj")]
    (2 * plain_loop(x, counts.tolist(), *sliced).square().sum()).backward()
    for name, param in experts.named_parameters():
        torch.testing.assert_close(ours[name], param.grad, rtol=1e-5, atol=1e-5)
        outside = torch.ones(E, dtype=torch.bool)
        outside[first : first + local] = False
        assert ours[name][outside].abs().sum() == 0


def _train_steps(experts, x, counts, steps, zero_grad=True):
    """`steps` plain-loop steps of a squared-output loss; returns each step's gradients as handed over."""
    seen = []
    for _ in range(steps):
        experts(x, counts).square().sum().backward()
        seen.append({n: p.grad for n, p in experts.named_parameters()})
        if zero_grad:
            experts.zero_grad(set_to_none=True)
    return seen


def test_a_plain_cpu_loop_reuses_the_gradient_and_activation_buffers_of_the_previous_step():
    """After zero_grad dropped them, the next backward writes its weight gradients into the same memory
    (under glibc's defaults these blocks were otherwise trimmed and page-faulted back every step), and the
    values are a fresh model's."""
    torch.manual_seed(0)
    experts = GroupedExperts(E, C, I, grouped_gemm="off")
    counts, x = torch.tensor(SIZES), torch.randn(sum(SIZES), C)
    pointers = []
    for _ in range(3):
        grads = _train_steps(experts, x, counts, 1, zero_grad=False)[0]
        pointers.append({n: g.data_ptr() for n, g in grads.items()})
        values = {n: g.clone() for n, g in grads.items()}
        del grads
        experts.zero_grad(set_to_none=True)
    assert pointers[1] == pointers[0] and pointers[2] == pointers[0]
    fresh = GroupedExperts(E, C, I, grouped_gemm="off")
    fresh.load_state_dict(experts.state_dict())
    expected = _train_steps(fresh, x, counts, 1, zero_grad=False)[0]
    for name, value in values.items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=0)


def test_a_gradient_still_in_use_is_never_overwritten():
    """A caller keeping last step's gradient, or accumulating into .grad, gets new memory for the next one."""
    torch.manual_seed(0)
    experts = GroupedExperts(E, C, I, grouped_gemm="off")
    counts, x = torch.tensor(SIZES), torch.randn(sum(SIZES), C)
    first, second = _train_steps(experts, x, counts, 2)
    kept = {n: g.clone() for n, g in first.items()}
    for name, grad in first.items():
        torch.testing.assert_close(grad, kept[name], rtol=0, atol=0)
        assert grad.data_ptr() != second[name].data_ptr()
    view = second["gate_proj"][0]  # a view alone keeps the storage busy too
    del first, second
    third = _train_steps(experts, x, counts, 1)[0]
    assert third["gate_proj"].untyped_storage().data_ptr() != view.untyped_storage().data_ptr()
    experts.zero_grad(set_to_none=True)
    accumulated = _train_steps(experts, x, counts, 3, zero_grad=False)[-1]  # .grad is alive: adds, no reuse
    for name, grad in accumulated.items():
        torch.testing.assert_close(grad, 3 * kept[name], rtol=1e-5, atol=1e-5)


def test_copies_of_the_experts_start_without_buffers():
    import copy
    import pickle

    experts = GroupedExperts(E, C, I, grouped_gemm="off")
    _train_steps(experts, torch.randn(sum(SIZES), C), torch.tensor(SIZES), 1)
    assert experts.gradient_buffers._storages  # kept after the step
    for copied in (copy.deepcopy(experts), pickle.loads(pickle.dumps(experts))):
        assert copied.gradient_buffers._storages == {}
