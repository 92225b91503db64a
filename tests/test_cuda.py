"""The CUDA path: attention backends, grouped GEMM, host syncs, DeepSpeed in bf16, sampling and routing.

Run with `pytest -m cuda`; without a GPU every test is skipped. `scripts/device_check.sh --dry-run`
sets DIT_MOE_CUDA_TESTS_ON_CPU=1, which runs the same tests, at the same tiny sizes, on the CPU
(all but the host-sync test, which needs CUDA's sync detector), so the logic is exercised before a
GPU window is spent on it.
"""

import os
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

from dit_moe.models.attention import Attention, flash_attn_available
from dit_moe.models.config import MoEArgs
from dit_moe.models.experts import GroupedExperts
from dit_moe.models.moe import MoEFeedForward
from dit_moe.routing import RoutingRequest, collect_routing
from dit_moe.routing.stats import load_counts
from dit_moe.sampling import SamplingOptions, SamplingRequest
from dit_moe.sampling.grid import main as sample_main

from trainer_runs import REPO, losses, train_cmd
from trainer_runs import env as trainer_env

HAS_GPU = torch.cuda.is_available()
ON_CPU = os.environ.get("DIT_MOE_CUDA_TESTS_ON_CPU") == "1"
DEVICE = torch.device("cuda" if HAS_GPU else "cpu")
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not (HAS_GPU or ON_CPU), reason="needs a CUDA GPU")]
needs_cuda = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
BF16_RTOL = 2e-2  # relative error (by norm) of a bf16 result against the fp32 one: bf16 keeps 8 significant bits


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


def forward_backward(module, x, grad):
    """Output, input gradient and parameter gradients of one forward + backward with output cotangent `grad`."""
    module.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    out = module(x)
    out.backward(grad)
    return out.detach(), x.grad, {name: p.grad for name, p in module.named_parameters()}


def attention_backends() -> list[str]:
    return ["sdpa", "math"] + (["flash"] if HAS_GPU and flash_attn_available() else [])


@pytest.mark.parametrize("backend", attention_backends())
def test_attention_backend_in_bf16_is_as_accurate_as_bf16_math(backend):
    """Each backend in bf16 (SDPA picks its fused kernels on CUDA) agrees with fp32 math attention,
    forward and backward, to bf16 tolerance: outputs and input gradients within 2%, and every tensor
    no further from fp32 than math attention in bf16 is (the q/k-norm weight gradients sum 2,048
    bf16 terms each and are a few % off even there); 256 tokens of head width 64, as DiT-XL/2 at 256 px."""
    torch.manual_seed(0)
    reference = Attention(256, 4, qk_norm=True, backend="math").to(DEVICE)
    x, grad = torch.randn(2, 256, 256, device=DEVICE), torch.randn(2, 256, 256, device=DEVICE)
    want = forward_backward(reference, x, grad)
    results = {}
    for name in {"math", backend}:
        module = Attention(256, 4, qk_norm=True, backend=name).to(DEVICE)
        module.load_state_dict(reference.state_dict())
        results[name] = forward_backward(module.to(torch.bfloat16), x.bfloat16(), grad.bfloat16())
    got, bf16_math = results[backend], results["math"]
    assert got[0].dtype == torch.bfloat16
    assert relative_error(got[0], want[0]) < BF16_RTOL
    assert relative_error(got[1], want[1]) < BF16_RTOL
    for name, g in want[2].items():
        floor = relative_error(bf16_math[2][name], g)
        assert relative_error(got[2][name], g) <= max(BF16_RTOL, 1.5 * floor), name


@pytest.mark.parametrize("expert_type", ["swiglu", "gelu"])
def test_grouped_gemm_equals_loop_in_bf16_with_uneven_and_empty_experts(expert_type):
    """torch._grouped_mm and the per-expert loop give the fp32 loop's outputs and gradients to bf16
    tolerance when the experts get 37, 0, 90 and 1 rows; the empty expert's gradient is zero, not None."""
    torch.manual_seed(0)
    oracle = GroupedExperts(4, 64, 128, expert_type, grouped_gemm="off").to(DEVICE)
    with torch.no_grad():
        for p in oracle.parameters():
            p.normal_(0, 0.1)  # biases too (they start at zero)
    counts = torch.tensor([37, 0, 90, 1], device=DEVICE)
    x, grad = torch.randn(128, 64, device=DEVICE), torch.randn(128, 64, device=DEVICE)
    xs = x.clone().requires_grad_(True)
    oracle(xs, counts).backward(grad)
    want = {name: p.grad for name, p in oracle.named_parameters()}
    for mode in ("on", "off"):
        experts = GroupedExperts(4, 64, 128, expert_type, grouped_gemm=mode).to(DEVICE, torch.bfloat16)
        experts.load_state_dict(oracle.state_dict())
        assert experts.use_grouped(torch.bfloat16, DEVICE) == (mode == "on")
        xb = x.bfloat16().requires_grad_(True)
        out = experts(xb, counts)
        out.backward(grad.bfloat16())
        with torch.no_grad():
            assert relative_error(out, oracle(x, counts)) < BF16_RTOL, mode
        assert relative_error(xb.grad, xs.grad) < BF16_RTOL, mode
        for name, p in experts.named_parameters():
            assert p.grad is not None, (mode, name)
            assert torch.count_nonzero(p.grad[1]) == 0, (mode, name)  # expert 1 saw no rows
            assert relative_error(p.grad, want[name]) < BF16_RTOL, (mode, name)


@needs_cuda
def test_dropless_moe_layer_makes_no_host_device_sync():
    """Forward and backward of the dropless MoE layer (router, dispatch, grouped GEMM, combine, shared
    expert, aux loss) never wait for the GPU; the loop path's one sync, reading the per-expert slice
    sizes (`counts.tolist()`, needed to split the buffer on the host), is caught by the same detector."""
    torch.manual_seed(0)
    layers = {
        mode: MoEFeedForward(256, 1024, MoEArgs(num_experts=8, num_experts_per_tok=2, grouped_gemm=mode))
        .to(DEVICE, torch.bfloat16)
        .train()
        for mode in ("auto", "off")
    }
    x = torch.randn(4, 256, 256, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)

    def step(layer):
        y, aux = layer(x)
        (y.float().square().mean() + sum(aux.values())).backward()

    for layer in layers.values():
        step(layer)  # first calls: cuBLAS handles, allocator growth
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step(layers["auto"])
        with pytest.raises(RuntimeError, match="synchroniz"):
            step(layers["off"])
    finally:
        torch.cuda.set_sync_debug_mode(0)


def _launch(results_dir, precision: str, zero: str) -> subprocess.Popen:
    cmd = train_cmd(results_dir, "--precision", precision, "--max-steps", "3", "--global-batch-size", "4", zero=zero)
    env = dict(trainer_env(), DS_ACCELERATOR="cuda" if HAS_GPU else "cpu")
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_trainer_step_in_bf16_agrees_with_fp32(tmp_path, zero):
    """Three trainer steps through DeepSpeed on one device (both runs at once) give finite losses in
    bf16 that agree with fp32's, same seed and data, to bf16 tolerance."""
    runs = {precision: _launch(tmp_path / precision, precision, zero) for precision in ("bf16", "fp32")}
    for precision, proc in runs.items():
        output, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{precision} trainer failed:\n{output[-4000:]}"
    got, want = losses(tmp_path / "bf16"), losses(tmp_path / "fp32")
    assert sorted(got) == sorted(want) == [1, 2, 3]
    for step in want:
        assert np.isfinite(got[step]) and np.isfinite(want[step])
        assert got[step] == pytest.approx(want[step], rel=BF16_RTOL), step


def _grid(tiny_export, out, device: str, dtype: str) -> np.ndarray:
    flags = "--vae-path none --image-size 8 --class-labels 1,2 --num-sampling-steps 4 --cfg-scale 1.5 --seed 0"
    argv = ["--ckpt", str(tiny_export), *flags.split(), "--device", device, "--dtype", dtype, "--out", str(out)]
    assert sample_main(argv, prog="sample.py") == 0
    return np.asarray(Image.open(out), dtype=np.float64)


def test_sample_py_on_the_device_draws_the_cpu_images(tiny_export, tmp_path):
    """sample.py on the device (bf16 autocast on CUDA) draws the images that the CPU draws in fp32 from
    the same seeds (per-sample CPU generators), up to a few 8-bit levels of rounding."""
    dtype = "bf16" if HAS_GPU else "fp32"
    got = _grid(tiny_export, tmp_path / "device.png", str(DEVICE), dtype)
    want = _grid(tiny_export, tmp_path / "cpu.png", "cpu", "fp32")
    assert got.shape == want.shape
    assert np.abs(got - want).mean() < 4.0


def test_routing_collection_on_the_device(tiny_export, tmp_path):
    """The routing recorder on the device sees every token of every MoE layer at every step, top-k each."""
    sampling = SamplingRequest(tiny_export, vae_path="none", options=SamplingOptions(num_steps=3), device=str(DEVICE))
    request = RoutingRequest(sampling, classes=[0, 3], samples_per_class=2, progress=False)
    out = collect_routing(request, tmp_path / "routing.npz")
    counts = load_counts(str(out))
    tokens_per_layer = 2 * 2 * 3 * 16  # classes x samples x steps x (8 / 2)^2 patches (conditional half)
    assert counts.expert_totals.shape == (len(counts.moe_layers), 4)
    assert (counts.expert_totals.sum(axis=1) == tokens_per_layer * counts.top_k).all()
