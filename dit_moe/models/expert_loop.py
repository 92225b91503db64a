"""The SwiGLU experts' loop of matrix products with a hand-written backward.

Autograd through `split` -> per-expert `mm` -> `cat` costs, per projection and layer, a stack of
the E per-expert weight gradients into a fresh [E, ...] tensor and a concatenation of the outputs;
on a CPU those copies (and the first-touch page faults of their fresh buffers) took about a tenth
of a DiT-MoE-S/2 training step (bench/step_profile.py). Here every product writes straight into
its slice of one output, input-gradient or weight-gradient buffer, and the weight gradients come
out already contiguous in the parameters' [E, out, in] layout, so the optimizer reads them as they
are. Forward values are those of the plain loop; gradients agree with autograd's to rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


class SwiGLUExpertLoop(torch.autograd.Function):
    """y_e = down_e(silu(gate_e(x_e)) * up_e(x_e)) for consecutive row blocks x_e of sizes `sizes`.

    x [S, C]; gate, up [E, I, C]; down [E, C, I] -> y [S, C]. Saves x and the two [S, I]
    pre-activations; the product silu(g) * u is recomputed in backward rather than kept.
    """

    @staticmethod
    def forward(ctx, x: Tensor, sizes: list[int], gate: Tensor, up: Tensor, down: Tensor) -> Tensor:
        S, I = x.shape[0], gate.shape[1]
        gate_pre, up_pre = x.new_empty(S, I), x.new_empty(S, I)
        y = x.new_empty(S, down.shape[1])
        start = 0
        for e, n in enumerate(sizes):
            if n:
                rows = slice(start, start + n)
                torch.mm(x[rows], gate[e].t(), out=gate_pre[rows])
                torch.mm(x[rows], up[e].t(), out=up_pre[rows])
                torch.mm(F.silu(gate_pre[rows]) * up_pre[rows], down[e].t(), out=y[rows])
            start += n
        ctx.sizes = sizes
        ctx.save_for_backward(x, gate_pre, up_pre, gate, up, down)
        return y

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        x, gate_pre, up_pre, gate, up, down = ctx.saved_tensors
        need_x, _, need_gate, need_up, need_down = ctx.needs_input_grad
        grad_y = grad_y.contiguous()
        grad_x = torch.empty_like(x) if need_x else None
        grad_gate, grad_up, grad_down = (
            torch.empty_like(w, memory_format=torch.contiguous_format) if need else None
            for w, need in ((gate, need_gate), (up, need_up), (down, need_down))
        )
        start = 0
        for e, n in enumerate(ctx.sizes):
            if n == 0:
                for grad in (grad_gate, grad_up, grad_down):
                    if grad is not None:
                        grad[e].zero_()
                continue
            rows = slice(start, start + n)
            g, u, dy, xe = gate_pre[rows], up_pre[rows], grad_y[rows], x[rows]
            silu_g = F.silu(g)
            if grad_down is not None:
                torch.mm(dy.t(), silu_g * u, out=grad_down[e])  # [C, n] x [n, I]
            d_act = torch.mm(dy, down[e])  # [n, I]
            d_up = d_act * silu_g
            d_gate = torch.ops.aten.silu_backward(d_act.mul_(u), g)  # one fused pass: grad * silu'(g)
            if grad_gate is not None:
                torch.mm(d_gate.t(), xe, out=grad_gate[e])
            if grad_up is not None:
                torch.mm(d_up.t(), xe, out=grad_up[e])
            if grad_x is not None:  # not needed when the layer's input is a leaf (a benchmark's, say)
                torch.mm(d_gate, gate[e], out=grad_x[rows])
                grad_x[rows].addmm_(d_up, up[e])
            start += n
        return grad_x, None, grad_gate, grad_up, grad_down
