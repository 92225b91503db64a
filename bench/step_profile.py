"""Where a training step and a guided sampling step spend their time, ours against the reference style.

    python bench/step_profile.py                      # DiT-MoE-S/2 8E2A, 16x16x4 latents, batch 8, 1 thread, fp32
    python bench/step_profile.py --input-size 32 --threads 2 --json results/profile.json
    python bench/step_profile.py --gemm-shapes 8   # also the training step's costliest GEMM shapes
    python bench/step_profile.py --host-memory glibc-defaults   # as a plain torch loop gets it: no malloc setting

Both models (ours, and bench/reference.py's restatement of feizc/DiT-MoE's MoE layer with the same
weights) run the same step under torch's profiler, after warm-up:
  train   forward + IDDPM loss + backward + the trainer's optimizer (torch AdamW, fused on CPU and GPU)
  sample  one classifier-free-guided forward (`forward_with_cfg` over [cond; uncond]) in eval mode

Each profiled op's self time goes to one class:
  optimizer   everything under the optimizer step (and zero_grad)
  routing     the router, dispatch and combine: ops inside an MoE layer but outside its experts,
              and the backward of those ops (matched to their forward op by autograd's sequence number)
  gemm        matrix products (mm, addmm, bmm, linear, grouped mm, convolution) elsewhere
  attention   scaled-dot-product attention (forward and backward kernels)
  elementwise everything else: normalisation, activations, modulate/gate/residual, copies, the loss
Achieved GFLOP/s of the gemm class uses the profiler's own FLOP count of those ops; of the whole
step, dit_moe.models.flops' count (training 3x forward). Both are set against the square-GEMM rate
measured in the same run. Step times are medians of alternated, unprofiled runs: they are the
measure. Class times are not: under the profiler the process page-faults again (its own event
buffers move the heap; on a 2-core EPYC ~150,000-280,000 faults per profiled S/2 step against ~0
unprofiled), so memory-bound ops look slower than they are, and unevenly between the two models.
Page faults per unprofiled step (the median over the timed runs) are printed beside the step times;
`--host-memory kept` (the default) applies dit_moe.utils.host_memory's setting, as the trainer and the
sampling tools do on a CPU; `glibc-defaults` leaves malloc as a user's own torch loop has it.
(Not named bench/profile.py: bench/ is on every benchmark's import path, and that name would
shadow the standard library's `profile`, which torch._dynamo imports through cProfile.)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import statistics
import time

import torch
from torch.autograd.profiler import record_function
from torch.profiler import ProfilerActivity, profile

from dit_moe.diffusion import build_objective, guided
from dit_moe.models import DiT, flops
from dit_moe.models.experts import GroupedExperts, SwiGLUMLP
from dit_moe.models.moe import MoEFeedForward
from dit_moe.utils.host_memory import keep_freed_memory

from common import add_model_flags, in_turns, model_config
from reference import MaskLoopMoE, MoeMLP, load_weights, reference_dit

CLASSES = ("gemm", "attention", "elementwise", "routing", "optimizer")
GEMM_OPS = {
    "aten::mm",
    "aten::addmm",
    "aten::addmm_",
    "aten::bmm",
    "aten::baddbmm",
    "aten::_grouped_mm",
    "aten::mkldnn_convolution",
    "aten::convolution_backward",
    "aten::_convolution",
}
PROFILED_STEPS = 3
MATRIX_PRODUCTS = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm"}
SMALL_INNER = 128  # GEMMs reducing over fewer rows than this run far below the square-GEMM rate
ATTENTION_MARK = "scaled_dot_product"
SCOPE_ROUTING, SCOPE_EXPERTS, SCOPE_OPTIMIZER = "profile::routing", "profile::experts", "profile::optimizer"


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(p)
    p.set_defaults(input_size=16)
    p.add_argument("--batch-size", type=int, default=8, help="training images; guided sampling sees twice as many")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=7, help="alternated timed runs per model and step")
    p.add_argument("--gemm-size", type=int, default=None, help="side of the square GEMM (default 2048 on CPU)")
    p.add_argument(
        "--gemm-shapes", type=int, default=0, help="also list the training step's K costliest GEMM shapes per model"
    )
    p.add_argument(
        "--host-memory",
        choices=("kept", "glibc-defaults"),
        default="kept",
        help="kept: keep_freed_memory() as our CPU tools do; glibc-defaults: malloc as a plain torch loop has it",
    )
    p.add_argument("--json", default=None, help="also write the results to this file")
    return p.parse_args(argv)


def scope_modules(model: torch.nn.Module) -> None:
    """Mark MoE layers and their experts with profiler ranges, so their ops can be told apart."""

    def enter(name):
        def hook(module, args):
            module._profile_range = record_function(name)
            module._profile_range.__enter__()

        return hook

    def leave(module, args, output):
        module._profile_range.__exit__(None, None, None)

    for module in model.modules():
        if isinstance(module, (MoEFeedForward, MaskLoopMoE)):
            module.register_forward_pre_hook(enter(SCOPE_ROUTING))
            module.register_forward_hook(leave)
        elif isinstance(module, (GroupedExperts, SwiGLUMLP, MoeMLP)):
            module.register_forward_pre_hook(enter(SCOPE_EXPERTS))
            module.register_forward_hook(leave)


def innermost_scope(event) -> str | None:
    """The nearest enclosing profile:: range of a profiler event, or None."""
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("profile::"):
            return parent.name
        parent = parent.cpu_parent
    return None


def classify(events) -> dict[str, dict[str, float]]:
    """Self time (s) and profiler FLOPs per class; backward ops inherit their forward op's scope."""
    forward_scope: dict[int, str | None] = {}
    for event in events:
        if event.sequence_nr >= 0 and not event.name.startswith("autograd::"):
            forward_scope.setdefault(event.sequence_nr, innermost_scope(event))
    out = {name: {"seconds": 0.0, "flops": 0.0} for name in CLASSES}
    for event in events:
        if event.name.startswith("profile::"):
            continue
        scope = innermost_scope(event)
        if scope is None:
            backward = event
            while backward is not None and not backward.name.startswith("autograd::engine::evaluate_function"):
                backward = backward.cpu_parent
            if backward is not None:
                scope = forward_scope.get(backward.sequence_nr)
        if scope == SCOPE_OPTIMIZER:
            name = "optimizer"
        elif scope == SCOPE_ROUTING:
            name = "routing"
        elif event.name in GEMM_OPS:
            name = "gemm"
        elif ATTENTION_MARK in event.name:
            name = "attention"
        else:
            name = "elementwise"
        out[name]["seconds"] += event.self_cpu_time_total / 1e6
        out[name]["flops"] += event.flops or 0
    return out


def train_step(model: DiT, optimizer: torch.optim.Optimizer, batch: dict):
    """`step()`: one forward + IDDPM loss + backward + optimizer step on the same batch each time;
    returns the seconds of the forward + backward alone."""
    objective = build_objective("iddpm", learn_sigma=model.config.learn_sigma)

    def model_fn(x_t, t, y):
        out, _ = model(x_t, t, y, return_aux=True)
        return out

    def step() -> float:
        start = time.perf_counter()
        terms = objective.loss(model_fn, batch["x"], dict(y=batch["y"]), noise=batch["noise"], timesteps=batch["t"])
        terms["loss"].mean().backward()
        compute_s = time.perf_counter() - start
        with record_function(SCOPE_OPTIMIZER):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return compute_s

    return step


def sample_step(model: DiT, batch: dict):
    """`step()`: one guided forward (cfg 4) of the batch's images, cond and uncond in one call;
    returns its seconds."""
    fn = guided(model, 4.0, null_label=model.num_classes)
    x, t, y = batch["x"], batch["t"][0].float(), batch["y"]

    @torch.no_grad()
    def step() -> float:
        start = time.perf_counter()
        fn(x, t, y)
        return time.perf_counter() - start

    return step


def gemm_shapes(events) -> dict[str, dict[str, float]]:
    """Per GEMM op and input shapes: self seconds, profiler FLOPs, calls and the inner (reduced)
    dimension, over all profiled steps."""
    out: dict[str, dict[str, float]] = {}
    for event in events:
        if event.name not in GEMM_OPS or not event.input_shapes:
            continue
        shapes = [s for s in event.input_shapes if s]
        left = shapes[1] if event.name.startswith("aten::addmm") else shapes[0]
        inner = left[-1] if event.name in MATRIX_PRODUCTS and left else None  # not for convolutions
        entry = out.setdefault(f"{event.name} {shapes}", {"seconds": 0.0, "flops": 0.0, "calls": 0, "inner": inner})
        entry["seconds"] += event.self_cpu_time_total / 1e6
        entry["flops"] += event.flops or 0
        entry["calls"] += 1
    return out


def measure(steps: dict, repeats: int, record_shapes: bool = False) -> dict[str, tuple[float, float, dict, dict]]:
    """Per step: the median wall time of `repeats` runs and of their compute part (what `step()`
    returns), the steps taking turns after one warm-up each, then its classes per step from
    `PROFILED_STEPS` profiled runs (and, with `record_shapes`, its GEMMs by shape)."""

    def timed(step) -> tuple[float, float, int]:
        faults, start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
        compute_s = step()
        elapsed = time.perf_counter() - start
        return elapsed, compute_s, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults

    for step in steps.values():
        step()
    timings = in_turns({name: (lambda step=step: timed(step)) for name, step in steps.items()}, repeats)
    out = {}
    for name, step in steps.items():
        with profile(activities=[ProfilerActivity.CPU], with_flops=True, record_shapes=record_shapes) as prof:
            for _ in range(PROFILED_STEPS):
                step()
        events = prof.events()
        classes = classify(events)
        shapes = gemm_shapes(events) if record_shapes else {}
        for value in classes.values():
            value["seconds"] /= PROFILED_STEPS
            value["flops"] /= PROFILED_STEPS
        for value in shapes.values():
            for key in ("seconds", "flops", "calls"):
                value[key] /= PROFILED_STEPS
        seconds, compute_seconds, faults = zip(*timings[name])
        medians = (statistics.median(values) for values in (seconds, compute_seconds, faults))
        out[name] = (*medians, classes, shapes)
    return out


def main() -> None:
    args = parse()
    torch.set_num_threads(args.threads)
    if args.host_memory == "kept":
        keep_freed_memory()  # as the trainer and the sampling tools do on a CPU
    config = model_config(args)
    torch.manual_seed(0)
    ours = DiT(config)
    reference = load_weights(reference_dit(config), ours)
    gen = torch.Generator().manual_seed(0)
    shape = (args.batch_size, args.in_channels, args.input_size, args.input_size)
    batch = {
        "x": torch.randn(shape, generator=gen),
        "noise": torch.randn(shape, generator=gen),
        "y": torch.randint(0, config.num_classes, (args.batch_size,), generator=gen),
        "t": (torch.randint(0, 1000, (args.batch_size,), generator=gen), torch.ones(args.batch_size)),
    }
    models = {"ours": ours, "reference": reference}
    for model in models.values():
        scope_modules(model)
    train_steps = {
        name: train_step(model.train(), torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True), batch)
        for name, model in models.items()
    }
    measured = {
        "train": measure(train_steps, args.repeats, record_shapes=args.gemm_shapes > 0)
    }  # before eval(): the train steps need train mode
    sample_steps = {name: sample_step(model.eval(), batch) for name, model in models.items()}
    measured["sample"] = measure(sample_steps, args.repeats)
    device = torch.device("cpu")
    gemm_rate = flops.measure_gemm_rate(device, torch.float32, args.gemm_size)
    step_flops = {
        "train": flops.training_flops(config) * args.batch_size,
        "sample": flops.guided_step_flops(config) * args.batch_size,
    }
    report = {
        "device": flops.device_name(device, args.threads),
        "config": f"{args.model} {args.num_experts}E{args.num_experts_per_tok}A, {shape[1:]} latents, batch {args.batch_size}",
        "gemm_gflops": gemm_rate / 1e9,
        "host_memory": args.host_memory,
        "rows": {},
    }
    for kind, results in measured.items():
        for name, (seconds, compute_s, faults, classes, shapes) in results.items():
            report["rows"][f"{name} {kind}"] = {
                "seconds": seconds,
                "compute_seconds": compute_s,
                "page_faults": faults,
                "gflops": step_flops[kind] / seconds / 1e9,
                "gemm_fraction": step_flops[kind] / seconds / gemm_rate,
                "compute_gemm_fraction": step_flops[kind] / compute_s / gemm_rate,
                "classes": {
                    c: {
                        "seconds": v["seconds"],
                        "gflops": v["flops"] / v["seconds"] / 1e9 if v["flops"] and v["seconds"] else None,
                    }
                    for c, v in classes.items()
                },
            }
            if shapes:
                report["rows"][f"{name} {kind}"]["gemm_shapes"] = summarise_shapes(shapes, args.gemm_shapes)
    print_report(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


def summarise_shapes(shapes: dict[str, dict[str, float]], top: int) -> dict:
    """The `top` costliest GEMM shapes, and all GEMMs whose inner dimension is under `SMALL_INNER`
    (an expert's weight gradient over the few tokens routed to it, say) taken together."""

    def rate(v):
        return v["flops"] / v["seconds"] / 1e9 if v["flops"] and v["seconds"] else None

    ranked = sorted(shapes.items(), key=lambda kv: -kv[1]["seconds"])[:top]
    small = [v for v in shapes.values() if v["inner"] is not None and v["inner"] < SMALL_INNER]
    small_total = {k: sum(v[k] for v in small) for k in ("seconds", "flops")}
    return {
        "top": [{"shape": k, "seconds": v["seconds"], "calls": v["calls"], "gflops": rate(v)} for k, v in ranked],
        "small_inner": {"seconds": small_total["seconds"], "gflops": rate(small_total)},
        "all_seconds": sum(v["seconds"] for v in shapes.values()),
    }


def print_report(report: dict) -> None:
    print(
        f"{report['config']} on {report['device']}; square GEMM {report['gemm_gflops']:.1f} GFLOP/s;"
        f" host memory: {report['host_memory']}"
    )
    header = f"{'':18}{'step ms':>9}{'GFLOP/s':>9}{'of GEMM':>9}{'fwd+bwd':>9}" + "".join(f"{c:>13}" for c in CLASSES)
    print(header + "   (class: profiled ms [GFLOP/s])")
    for name, row in report["rows"].items():
        cells = ""
        for c in CLASSES:
            v = row["classes"][c]
            rate = f"[{v['gflops']:.0f}]" if v["gflops"] else ""
            cells += f"{v['seconds'] * 1e3:>8.1f}{rate:>5}"
        compute = f"{row['compute_gemm_fraction']:9.0%}" if name.endswith("train") else f"{'':9}"
        print(f"{name:18}{row['seconds'] * 1e3:9.1f}{row['gflops']:9.1f}{row['gemm_fraction']:9.0%}{compute}{cells}")
    print(
        "of GEMM: the step's FLOPs (dit_moe.models.flops) per second over the square-GEMM rate; fwd+bwd: the same for"
    )
    print("the forward + backward alone. Class times come from profiled runs (the profiler adds its own overhead).")
    rows = report["rows"]
    for name, row in rows.items():
        if "gemm_shapes" not in row:
            continue
        shapes = row["gemm_shapes"]
        small = shapes["small_inner"]
        print(
            f"{name}: GEMMs by shape, profiled ms per step of {shapes['all_seconds'] * 1e3:.0f}; inner dimension"
            f" < {SMALL_INNER} together: {small['seconds'] * 1e3:.0f} ms at {small['gflops'] or 0:.0f} GFLOP/s"
        )
        for entry in shapes["top"]:
            print(
                f"  {entry['seconds'] * 1e3:8.1f} ms {entry['gflops'] or 0:6.1f} GFLOP/s {entry['calls']:5.0f} calls  {entry['shape']}"
            )
    for kind in ("train", "sample"):
        ours, ref = rows[f"ours {kind}"], rows[f"reference {kind}"]
        print(
            f"ours / reference, {kind} step time: {ours['seconds'] / ref['seconds']:.2f}x"
            f" (page faults per unprofiled step: {ours['page_faults']:,.0f} / {ref['page_faults']:,.0f})"
        )
    ours_opt, ref_opt = (
        rows[f"{m} train"]["seconds"] - rows[f"{m} train"]["compute_seconds"] for m in ("ours", "reference")
    )
    print(
        f"ours / reference, optimizer step (unprofiled): {ours_opt * 1e3:.0f} / {ref_opt * 1e3:.0f} ms = {ours_opt / ref_opt:.2f}x"
    )


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
