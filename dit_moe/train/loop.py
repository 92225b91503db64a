"""The training run: set up data, model, objective and engine, then loop over short steps.

One optimizer step = `grad_accum` micro-batches, each: draw randomness -> (VAE) -> objective
loss -> `engine.backward` -> `engine.step` (DeepSpeed applies the update on the accumulation
boundary) -> EMA -> every `log_every` steps reduce and log -> every `ckpt_every` steps save.

Randomness (timesteps, noise, label dropout) is drawn for the whole global micro-batch from a
seed of (seed, step, micro-step), and each rank takes its slice; so a run gives the same losses
on any number of processes, and a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import json
import logging
import signal
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from ..checkpoint import save_export
from ..data import build_codec, build_train_loader
from ..diffusion import build_objective
from ..models.masking import random_mask
from ..models.moe import MoEFeedForward
from ..parallel import AllToAllStats, ExpertParallel
from . import engine as engine_lib
from .build import build_model, build_model_config, objective_options
from .config import BatchPlan, TrainConfig
from .metrics import MetricsWriter, plot_loss_curve

log = logging.getLogger("dit_moe.train")

# Options that may differ from an --init-from checkpoint's config: they change training, not weights.
TRAINING_ONLY_FIELDS = (
    "grad_checkpointing", "attn_backend", "aux_loss_coef", "aux_loss_per_sample", "z_loss_coef",
    "capacity_factor", "class_dropout_prob", "objective", "flow_t_scale",
)


def load_deepspeed_config(path: str) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"DeepSpeed config {path} does not exist; pass one of config/zero*.json.")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"DeepSpeed config {path} is not valid JSON ({err}).") from err


def apply_precision(ds_config: dict[str, Any], precision: str, device: torch.device) -> str:
    """Resolve "auto" (the config's choice on GPU, fp32 on CPU) and write it into the config."""
    if precision == "auto":
        if device.type == "cpu":
            precision = "fp32"
        elif ds_config.get("bf16", {}).get("enabled"):
            precision = "bf16"
        elif ds_config.get("fp16", {}).get("enabled"):
            precision = "fp16"
        else:
            precision = "fp32"
    ds_config.setdefault("bf16", {})["enabled"] = precision == "bf16"
    ds_config.setdefault("fp16", {})["enabled"] = precision == "fp16"
    return precision


@dataclass
class StepRandomness:
    """This rank's slice of the global micro-batch's timesteps, weights, noise, label-dropout and patch masks."""

    t: torch.Tensor
    weights: torch.Tensor
    noise: torch.Tensor
    drop: torch.Tensor
    mask: torch.Tensor | None = None          # (N, T) bool, True = masked patch; None: no masking


def draw_step_randomness(objective, seed: int, step: int, micro: int, global_micro_batch: int,
                         sample_shape: tuple[int, ...], drop_prob: float, rank: int, world_size: int,
                         device: torch.device, mask_ratio: float = 0.0, num_tokens: int = 0) -> StepRandomness:
    """Draw for the whole global micro-batch from a (seed, step, micro) stream; keep rank's slice.

    With `mask_ratio > 0` also draws per-sample patch masks over `num_tokens` tokens (MaskDiT),
    after the other draws so unmasked runs keep their streams.

    The data loader gives rank r the global positions r, r + W, r + 2W, ... of each global
    micro-batch, so the slice is [r::W]; the same samples get the same noise for any W.
    """
    stream_seed = int(np.random.SeedSequence([seed, step, micro]).generate_state(1)[0])
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(stream_seed)
        t, weights = objective.timesteps.sample(global_micro_batch, device)
        noise = torch.randn((global_micro_batch, *sample_shape), device=device)
        drop = torch.rand(global_micro_batch, device=device) < drop_prob
        mask = random_mask(global_micro_batch, num_tokens, mask_ratio, device=device).mask if mask_ratio else None
    pick = slice(rank, None, world_size)
    return StepRandomness(t[pick], weights[pick], noise[pick], drop[pick].long(),
                          mask[pick] if mask is not None else None)


def share_timestep_losses(objective, t: torch.Tensor, losses: torch.Tensor) -> None:
    """Feed an adaptive timestep sampler every rank's (t, loss), in global-batch order.

    Rank r holds global positions r, r + W, ... (see `draw_step_randomness`), so every rank
    then keeps the same history as one process would, and keeps drawing the same global
    timesteps. Samplers that do not learn from losses cost no collective.
    """
    if not objective.timesteps.learns_from_losses:
        return
    if dist.is_initialized() and dist.get_world_size() > 1:
        world = dist.get_world_size()
        parts = [torch.empty_like(t) for _ in range(world)], [torch.empty_like(losses) for _ in range(world)]
        dist.all_gather(parts[0], t.contiguous())
        dist.all_gather(parts[1], losses.contiguous())
        t, losses = (torch.stack(p, dim=1).reshape(-1) for p in parts)  # [n, W] -> global order r + W * i
    objective.timesteps.update(t, losses)


def micro_step(engine, objective, x: torch.Tensor, y: torch.Tensor, rnd: StepRandomness,
               model_dtype: torch.dtype, mae_weight: float = 0.1) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Forward, loss and `engine.backward` for one micro-batch; returns (diffusion loss, aux losses).

    With a patch mask in `rnd` the loss includes `mae_weight` x the MAE term, which is also
    returned (detached, for logging only) as aux "mae" after the backward.
    """
    aux: dict[str, torch.Tensor] = {}

    def model_fn(x_t, t, y):
        out, layer_aux = engine(x_t.to(model_dtype), t, y, return_aux=True, force_drop_ids=rnd.drop, mask=rnd.mask)
        aux.update(layer_aux)
        return out.float()

    terms = objective.loss(model_fn, x.float(), dict(y=y), noise=rnd.noise, timesteps=(rnd.t, rnd.weights),
                           mask=rnd.mask, mae_weight=mae_weight,
                           loss_feedback=lambda t, losses: share_timestep_losses(objective, t, losses))
    loss = terms["loss"].mean()
    engine.backward(loss + sum(aux.values()) if aux else loss)
    if "mae" in terms:
        aux["mae"] = terms["mae"].mean().detach()
    return loss, aux


class StopRequest:
    """SIGTERM/SIGINT (preemption) sets a flag; ranks agree on it at step boundaries."""

    def __init__(self) -> None:
        self.requested = False
        self._group = dist.new_group(backend="gloo")
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, _frame) -> None:
        self.requested = True
        log.warning("Received signal %d: will checkpoint and stop after this step.", signum)

    def agreed(self) -> bool:
        """True on every rank when any rank was signalled (a CPU all-reduce: no device sync)."""
        flag = torch.tensor([int(self.requested)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        return bool(flag.item())


class LoadTracker:
    """Routed tokens per expert of every MoE layer, summed on device between log steps."""

    def __init__(self, model: torch.nn.Module, device: torch.device):
        self.layers = [m for m in model.modules() if isinstance(m, MoEFeedForward)]
        width = self.layers[0].tokens_per_expert.numel() if self.layers else 0
        self.total = torch.zeros(len(self.layers), width, device=device)

    def add(self) -> None:
        if self.layers:
            self.total += torch.stack([m.tokens_per_expert for m in self.layers])

    def summary(self, reduced: torch.Tensor) -> dict[str, float]:
        if not self.layers:
            return {}
        ratio = reduced.max(dim=1).values / reduced.mean(dim=1).clamp_min(1e-9)  # per layer max/mean load
        cv = reduced.std(dim=1, unbiased=False) / reduced.mean(dim=1).clamp_min(1e-9)
        return {"expert_load_max_over_mean": ratio.mean().item(), "expert_load_max_over_mean_worst": ratio.max().item(),
                "expert_load_cv": cv.mean().item()}


def expert_parallel_record(ep: ExpertParallel, steps: int, device: torch.device) -> dict[str, list[float]]:
    """Every rank's all-to-all traffic and time per optimizer step since the last log (a collective)."""
    local = ep.take_stats().as_tensor().to(device)
    per_rank = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(per_rank, local)
    table = (torch.stack(per_rank) / steps).T.tolist()  # host sync: logging; [rank, stat] -> [stat][rank]
    return {f"ep_{f.name}": values for f, values in zip(fields(AllToAllStats), table)}


def _setup_logging(results_dir: Path, rank: int) -> None:
    if rank != 0:
        logging.basicConfig(level=logging.WARNING)
        return
    results_dir.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S",
                        handlers=[logging.StreamHandler(), logging.FileHandler(results_dir / "log.txt")])


def train(cfg: TrainConfig) -> Optional[Path]:
    """Run (or resume) training as configured; returns the export path on rank 0."""
    cfg.data.check()  # paths first: a missing folder or VAE should not wait for process-group start-up
    rank, _local_rank, world_size, device = engine_lib.init_distributed()
    results_dir = Path(cfg.run.results_dir)
    checkpoint_dir = results_dir / "checkpoints"
    _setup_logging(results_dir, rank)

    ds_config = load_deepspeed_config(cfg.run.deepspeed_config)
    engine_lib.check_expert_parallel(cfg.run.ep_size, ds_config, world_size)
    plan = BatchPlan.resolve(cfg.run, world_size, ds_config)
    ds_config.update(train_micro_batch_size_per_gpu=plan.micro_batch, gradient_accumulation_steps=plan.grad_accum,
                     train_batch_size=plan.global_batch)
    ds_config.setdefault("steps_per_print", 10**9)
    if cfg.run.lr is not None:
        ds_config.setdefault("optimizer", {"type": "AdamW", "params": {}}).setdefault("params", {})["lr"] = cfg.run.lr
    precision = apply_precision(ds_config, cfg.run.precision, device)

    loader = build_train_loader(cfg.data, rank, world_size, plan.micro_batch, cfg.run.seed)
    codec = build_codec(cfg.data).to(device) if loader.needs_encoding else None
    model_config = build_model_config(cfg, loader.input_channels, loader.input_size, loader.num_classes)
    model = build_model(cfg, model_config)
    ep = engine_lib.setup_expert_parallel(model, cfg.run.ep_size)
    objective = build_objective(model_config.objective, **objective_options(cfg, model_config.learn_sigma))
    engine = engine_lib.initialize(model, ds_config, ep)
    ema = engine_lib.EMA(engine.module, cfg.run.ema_decay, ep)
    model_dtype = next(engine.module.parameters()).dtype

    step = 0
    if cfg.run.resume:
        resume_dir = checkpoint_dir if cfg.run.resume == "auto" else Path(cfg.run.resume)
        if resume_dir.name != "checkpoints" and (resume_dir / engine_lib.COMPLETE_MARKER).is_file():
            resume_dir, tag = resume_dir.parent, resume_dir.name
        else:
            tag = engine_lib.latest_complete_tag(resume_dir)
        if tag is None and cfg.run.resume != "auto":
            raise FileNotFoundError(f"--resume {cfg.run.resume}: no complete checkpoint found there.")
        if tag is not None:
            client = engine_lib.load_checkpoint(engine, ema, resume_dir, tag, ep)
            step = client["step"]
            loader.load_state_dict(client["data"])
            log.info("Resumed from %s at step %d.", resume_dir / tag, step)
    if rank == 0:
        cfg.save_yaml(results_dir / "config.yaml")
        n_params = sum(p.numel() for p in model.parameters())
        log.info("%s: %s parameters, %s experts x top-%d; %s on %d process(es), %s, global batch %d = %d x %d x %d.",
                 cfg.model.model, f"{n_params:,}", model_config.num_experts, model_config.num_experts_per_tok,
                 model_config.objective, world_size, precision, plan.global_batch, plan.micro_batch,
                 plan.grad_accum, world_size)
        if ep is not None:
            log.info("Expert parallelism: %d ranks per group, %d of %d experts per rank (the parameter count "
                     "above is this rank's).", ep.size, ep.num_local, ep.num_experts)

    def export() -> Optional[Path]:
        model_state, ema_state = engine_lib.full_model_state_dict(engine, ep), ema.full_state_dict()
        if rank != 0:
            return None
        return save_export(results_dir / f"export.{cfg.run.export_format}", model_config, model_state, ema_state)

    if cfg.run.export_only:
        path = export()
        dist.barrier()
        return path

    steps_per_epoch = max(1, loader.info.num_samples // plan.global_batch)
    total_steps = cfg.run.max_steps if cfg.run.max_steps is not None else cfg.run.epochs * steps_per_epoch
    stop = StopRequest()
    metrics = MetricsWriter(results_dir, enabled=rank == 0)
    tracker = LoadTracker(engine.module, device)
    sample_shape = (loader.input_channels, loader.input_size, loader.input_size)
    running: dict[str, torch.Tensor] = {}
    window_start, window_steps = time.perf_counter(), 0
    progress = tqdm(total=total_steps, initial=step, disable=rank != 0, desc="train", dynamic_ncols=True)

    def save(at_step: int) -> None:
        client = {"step": at_step, "data": loader.state_dict()}
        engine_lib.save_checkpoint(engine, ema, checkpoint_dir, at_step, client, model_config.to_dict(),
                                   cfg.run.keep_last, ep)

    engine.train()
    while step < total_steps:
        for micro in range(plan.grad_accum):
            x, y = next(loader)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if codec is not None:
                with torch.no_grad():
                    x = codec.encode(x)
            rnd = draw_step_randomness(objective, cfg.run.seed, step, micro, plan.micro_batch * world_size,
                                       sample_shape, model_config.class_dropout_prob, rank, world_size, device,
                                       cfg.model.mask_ratio, engine.module.num_tokens)
            loss, aux = micro_step(engine, objective, x, y, rnd, model_dtype, cfg.model.mae_loss_coef)
            engine.step()
            tracker.add()
            for name, value in (("loss", loss), *aux.items()):
                running[name] = running.get(name, 0.0) + value.detach().float()
        ema.update()
        step += 1
        window_steps += 1
        progress.update(1)

        if step % cfg.run.log_every == 0 or step == total_steps:
            names = sorted(running)
            packed = torch.stack([running[n] for n in names])
            dist.all_reduce(packed)
            load = tracker.total.clone()
            if tracker.layers:
                dist.all_reduce(load)
            values = (packed / (world_size * window_steps * plan.grad_accum)).tolist()  # host sync: logging
            elapsed = time.perf_counter() - window_start
            record = dict(zip(names, values))
            grad_norm = engine.get_global_grad_norm()
            record.update(
                grad_norm=float(grad_norm) if grad_norm is not None else None,
                lr=float(engine.get_lr()[0]),
                steps_per_s=window_steps / elapsed,
                images_per_s=window_steps * plan.global_batch / elapsed,
                **tracker.summary(load),
            )
            if ep is not None:
                record.update(expert_parallel_record(ep, window_steps, device))
            metrics.write(step, record)
            progress.set_postfix(loss=f"{record['loss']:.4f}")
            running, window_start, window_steps = {}, time.perf_counter(), 0
            tracker.total.zero_()

        stopping = stop.agreed()
        if step % cfg.run.ckpt_every == 0 or stopping or step == total_steps:
            save(step)
        if stopping:
            log.warning("Stopped at step %d after saving a checkpoint; resume with --resume auto.", step)
            break

    progress.close()
    metrics.close()
    path = export() if step >= total_steps else None
    if rank == 0:
        plot_loss_curve(results_dir / "metrics.jsonl", results_dir / "loss_curve.png",
                        title=f"{cfg.model.model} {model_config.num_experts}E{model_config.num_experts_per_tok}A "
                              f"({model_config.objective})")
        if path is not None:
            log.info("Exported %s", path)
    dist.barrier()
    return path
