"""The training run: `setup` -> `resume` -> (`train_step`, every `log_every` steps `log_window`,
every `ckpt_every` steps `save`) -> `finish`, driven by `train`.

One optimizer step = `grad_accum` micro-batches, each: draw randomness -> (VAE) -> objective
loss -> `engine.backward` -> `engine.step` (DeepSpeed applies the update on the accumulation
boundary; the routers' state updates hang on the optimizer step, `build.register_router_updates`),
then the EMA.

Randomness (timesteps, noise, label dropout, patch masks) is drawn by the objective for the whole
global micro-batch from a seed of (seed, step, micro-step), and each rank takes its slice; so a run
gives the same losses on any number of processes, and a resumed run continues exactly where it stopped.
Except with expert choice (--router expert-choice): each expert picks its tokens among its rank's
micro-batch, so its losses change with the per-rank micro-batch (processes x micro-batch x
accumulation is not enough); a resume that changes it is warned about (`routers`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from tqdm import tqdm

from ..checkpoint import CheckpointContents, read_checkpoint_file, record_of_contents, record_of_tag
from ..checkpoint.export import recorded_step
from ..checkpoint.layout import RunShape, read_run_record, tag_for_step
from ..data import TrainLoader, build_codec, build_train_loader
from ..data.check import check_features
from ..diffusion import Draws, DrawSpec, Objective, ObjectiveConfig, build_objective
from ..models import DiTConfig
from ..parallel import ExpertParallel
from ..utils.errors import UserError
from ..utils.launch import LaunchEnv
from . import engine as engine_lib
from .batch import BatchPlan
from .build import build_model_config, build_training_model, register_router_updates, settle_with_record
from .checkpointer import Checkpointer, CheckpointPlan, ResumePoint, find_resume
from .distributed import RankSlice, StopRequest
from .engine import ema_start_share
from .metrics import LoadTracker, MetricsWriter, Window, expert_parallel_record, plot_loss_curve
from .preflight import check_inputs
from .results import claim_results_dir
from .routers import ema_router_state, warn_if_routing_batch_changes
from .sections import TrainConfig
from .startup_notices import hold_startup_notices, take_startup_notices, write_startup_notices

log = logging.getLogger("dit_moe.train")


@dataclass
class Run:
    """Everything a training run holds once set up; `step` counts finished optimizer steps."""

    cfg: TrainConfig
    ranks: RankSlice
    device: torch.device
    plan: BatchPlan
    precision: str
    loader: TrainLoader
    codec: Optional[torch.nn.Module]  # encodes images on the fly (a VAE); None for latents
    model_config: DiTConfig
    objective_config: ObjectiveConfig
    objective: Objective
    draw_spec: DrawSpec
    engine: Any  # DeepSpeed's engine around the DiT
    ema: engine_lib.EMA
    ep: Optional[ExpertParallel]
    model_dtype: torch.dtype
    checkpointer: Checkpointer
    resume_from: Optional[ResumePoint]  # the complete tag --resume names; None: a fresh start
    step: int = 0

    @property
    def results_dir(self) -> Path:
        return Path(self.cfg.run.results_dir)

    @property
    def is_main(self) -> bool:
        return self.ranks.rank == 0


def _setup_logging(results_dir: Path, rank: int) -> None:
    if rank != 0:
        logging.basicConfig(level=logging.WARNING)
        return
    results_dir.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(
        level=logging.INFO,
        format="[%(asctime)s] %(message)s",
        datefmt="%H:%M:%S",
        handlers=[logging.StreamHandler(), logging.FileHandler(results_dir / "log.txt")],
    )


@dataclass
class Start:
    """A run's inputs once checked and settled, its process group up and its results folder claimed."""

    cfg: TrainConfig
    resume_from: Optional[ResumePoint]
    init: Optional[CheckpointContents]  # --init-from's file, read once (it may be GBs)
    rank: int
    world_size: int
    device: torch.device


def start(cfg: TrainConfig) -> Start:
    """Every cheap check, the checkpoint's record, the process group, the data check, then the folder:
    bad input fails before anything slow starts and before the results folder is claimed."""
    hold_startup_notices()  # warnings before the log exists go into it once (`startup_notices`)
    try:
        launch = LaunchEnv.from_environ()
        check_inputs(cfg, launch.world_size)  # paths, DeepSpeed JSON, batch split: no process group yet
        fresh = cfg.run.resume is None and not cfg.run.export_only
        resume_from = find_resume(cfg.run.resume, Path(cfg.run.results_dir))
        init = read_checkpoint_file(cfg.model.init_from) if cfg.model.init_from and resume_from is None else None
        cfg = settled_config(cfg, resume_from, init)  # what the checkpoint records, before anything is claimed
        rank, _local_rank, world_size, device = engine_lib.init_distributed()
        check_features(cfg.data, rank, world_size)  # each rank its share of the files; a bad one stops every rank
        claim_results_dir(Path(cfg.run.results_dir), fresh, cfg.run.overwrite, launch.rank)
        dist.barrier()  # every rank has judged the folder before rank 0 writes its log there
    except BaseException:
        take_startup_notices()  # dropped: a failed start's one error line stands alone
        raise
    notices = take_startup_notices()
    _setup_logging(Path(cfg.run.results_dir), rank)
    write_startup_notices(notices, rank)
    return Start(cfg, resume_from, init, rank, world_size, device)


def setup(cfg: TrainConfig, build_model: Callable[..., torch.nn.Module] = build_training_model) -> Run:
    """`start`, then DeepSpeed config, data, model, objective, engine, EMA and checkpointer.
    `build_model(cfg, model_config, init)` makes the module (bench/train.py swaps in its reference model)."""
    begun = start(cfg)
    cfg, device, rank, world_size = begun.cfg, begun.device, begun.rank, begun.world_size
    resumed = begun.resume_from.shape if begun.resume_from is not None else None
    ds_config, plan, precision = engine_lib.prepare_deepspeed_config(cfg.run, world_size, device, resumed)
    if resumed is not None and resumed.micro_batch is not None:
        _warn_if_draws_change(resumed, plan)

    loader = build_train_loader(cfg.data, rank, world_size, plan.micro_batch, cfg.run.seed, plan.global_batch)
    if resumed is not None:
        loader.check_resumable_on(resumed.world_size)
    codec = build_codec(cfg.data).to(device) if loader.needs_encoding else None
    model_config = build_model_config(cfg, loader.input_channels, loader.input_size, loader.num_classes, begun.init)
    warn_if_routing_batch_changes(model_config, resumed, plan)
    model = build_model(cfg, model_config, begun.init)
    begun.init = None  # the weights are in the model now
    ep = engine_lib.setup_expert_parallel(model, cfg.run.ep_size)
    ranks = RankSlice(rank, world_size)
    objective_config = cfg.objective.resolved()
    objective = build_objective(
        objective_config.objective, gather=ranks.gather, **objective_config.build_options(model_config.learn_sigma)
    )
    engine = engine_lib.initialize(model, ds_config, ep)
    register_router_updates(engine)
    ema = engine_lib.EMA(engine, cfg.run.ema_decay, ep, cfg.run.ema_warmup_steps)
    record = run_record(cfg, begun.resume_from)
    checkpointer = Checkpointer(
        engine, ema, ep, CheckpointPlan.for_run(cfg.run, plan, model_config, objective_config, record, device)
    )
    draw_spec = DrawSpec(
        (loader.input_channels, loader.input_size, loader.input_size),
        model_config.class_dropout_prob,
        cfg.model.mask_ratio,
        engine.module.num_tokens,
    )
    return Run(
        cfg,
        ranks,
        device,
        plan,
        precision,
        loader,
        codec,
        model_config,
        objective_config,
        objective,
        draw_spec,
        engine,
        ema,
        ep,
        next(engine.module.parameters()).dtype,
        checkpointer,
        begun.resume_from,
    )


def settled_config(
    cfg: TrainConfig, resume_from: Optional[ResumePoint], init: Optional[CheckpointContents]
) -> TrainConfig:
    """The run's config once the checkpoint it continues (or starts from) has had its say: what the
    checkpoint records is the truth, flags may repeat it or change only how the model trains; a resumed
    run's command must state its objective (`RecordedRun.unstated_objective`)."""
    if resume_from is not None:
        tag_dir = resume_from.tag_dir
        instead = f"start a new run from its weights with --init-from {tag_dir} and another --results-dir"
        record = record_of_tag(tag_dir)
        settled = settle_with_record(cfg, record, instead)
        if not cfg.run.export_only:  # an export only writes what the tag holds
            record.unstated_objective(asdict(cfg.objective), cfg.asked("objective"), instead)
            moved = record.check_vae(settled.data.codec_record(), instead)
            if moved:
                log.warning(moved)
        return settled
    if init is None:
        return cfg
    where = f"--init-from {cfg.model.init_from}"
    instead = (
        "train another architecture without --init-from (a dense file becomes an MoE one with upcycle.py), "
        "or pass --allow-objective-change True to fine-tune it into another objective on purpose"
    )
    return settle_with_record(cfg, record_of_contents(init, where), instead, cfg.model.allow_objective_change)


def run_record(cfg: TrainConfig, resume_from: Optional[ResumePoint]) -> dict[str, Any]:
    """What every tag and the export record beside the model and objective: the VAE the latents come from
    with their scale factor (what sampling decodes with) and the EMA's settings (what its starting weights'
    share is computed from). An export-only run writes what its tag records, not what its flags say."""
    record = {
        "vae": cfg.data.codec_record(),
        "ema_decay": cfg.run.ema_decay,
        "ema_warmup_steps": cfg.run.ema_warmup_steps,
    }
    if cfg.run.export_only and resume_from is not None:
        record.update(read_run_record(resume_from.tag_dir))
    return record


def _warn_if_draws_change(resumed: RunShape, plan: BatchPlan) -> None:
    """A resume whose global micro-batch differs continues the data exactly, but not the noise draws."""
    before, now = resumed.micro_batch * resumed.world_size, plan.micro_batch * plan.world_size
    if before != now:
        log.warning(
            "The global micro-batch changes from %d to %d samples (global batch %d = %d x %d x %d): the data "
            "continues exactly, but noise and timesteps are drawn per micro-batch and differ from an "
            "uninterrupted run's; resume on a number of processes that divides %d for an exact continuation.",
            before,
            now,
            plan.global_batch,
            plan.micro_batch,
            plan.grad_accum,
            plan.world_size,
            before,
        )


def resume(run: Run) -> None:
    """Restore the engine, EMA, step and data position from `run.resume_from`, on any shape."""
    if run.resume_from is None:
        return
    began = time.perf_counter()
    client = run.checkpointer.load(run.resume_from)
    run.step = client["step"]
    run.loader.load_state_dict(client["data"])
    log.info("Resumed from %s at step %d in %.2f s.", run.resume_from.tag_dir, run.step, time.perf_counter() - began)
    if "run.lr" in run.cfg.given:
        _change_learning_rate(run.engine, run.cfg.run.lr)


def _change_learning_rate(engine, lr: float) -> None:
    """A new --lr on resume replaces the one the optimizer state brought back (a legitimate change), said in the log."""
    groups = engine.optimizer.param_groups
    before = groups[0]["lr"]
    for group in groups:
        group["lr"] = lr
    if before != lr:
        log.info("Learning rate %g from the checkpoint replaced by --lr %g.", before, lr)


def announce(run: Run) -> None:
    """Rank 0 saves the resolved config beside the results and logs what is being trained."""
    if not run.is_main:
        return
    cfg, config, plan, ep = run.cfg, run.model_config, run.plan, run.ep
    cfg.save_yaml(run.results_dir / "config.yaml")
    n_params = num_parameters(run.engine.module)
    qk_norm = f"QK-norm (LayerNorm eps {config.qk_norm_eps:g})" if config.qk_norm else "no QK-norm"
    log.info(
        "%s %s: %s parameters, %s attention with %s; %s on %d process(es), %s, global batch %d = %d x %d x %d.",
        cfg.model.model,
        config.moe_shape,
        f"{n_params:,}",
        config.attn_backend,
        qk_norm,
        run.objective_config.objective,
        run.ranks.world_size,
        run.precision,
        plan.global_batch,
        plan.micro_batch,
        plan.grad_accum,
        run.ranks.world_size,
    )
    if ep is not None:
        log.info(
            "Expert parallelism: %d ranks per group, %d of %d experts per rank (the parameter count "
            "above is this rank's).",
            ep.size,
            ep.num_local,
            ep.num_experts,
        )


def micro_step(
    engine,
    objective: Objective,
    x: torch.Tensor,
    y: torch.Tensor,
    draws: Draws,
    model_dtype: torch.dtype,
    mae_weight: float = 0.1,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Forward, loss and `engine.backward` for one micro-batch; returns (diffusion loss, aux losses).

    With a patch mask in `draws` the loss includes `mae_weight` x the MAE term, which is also
    returned (detached, for logging only) as aux "mae" after the backward. No host sync, except
    that an adaptive timestep sampler moves the batch's losses to the CPU (`Objective.observe`).
    """
    aux: dict[str, torch.Tensor] = {}

    def model_fn(x_t, t, y):
        out, layer_aux = engine(x_t.to(model_dtype), t, y, return_aux=True, force_drop_ids=draws.drop, mask=draws.mask)
        aux.update(layer_aux)
        return out.float()

    terms = objective.loss(
        model_fn,
        x.float(),
        dict(y=y),
        noise=draws.noise,
        timesteps=(draws.t, draws.weights),
        mask=draws.mask,
        mae_weight=mae_weight,
    )
    loss = terms["loss"].mean()
    engine.backward(loss + sum(aux.values()) if aux else loss)
    if "mae" in terms:
        aux["mae"] = terms["mae"].mean().detach()
    return loss, aux


def train_step(run: Run, window: Window) -> None:
    """One optimizer step: `grad_accum` micro-batches, then the EMA; losses stay on device in `window`."""
    global_micro_batch = run.plan.micro_batch * run.ranks.world_size
    for micro in range(run.plan.grad_accum):
        x, y = next(run.loader)  # host: the loader's workers prefetch, so this rarely waits
        x, y = x.to(run.device, non_blocking=True), y.to(run.device, non_blocking=True)
        if run.codec is not None:
            with torch.no_grad():
                x = run.codec.encode(x)
        draws = run.objective.draw(
            (run.cfg.run.seed, run.step, micro), global_micro_batch, run.draw_spec, run.device, run.ranks.positions
        )
        loss, aux = micro_step(run.engine, run.objective, x, y, draws, run.model_dtype, run.cfg.model.mae_loss_coef)
        run.engine.step()  # the update on the accumulation boundary; DeepSpeed may sync there (overflow, clipping)
        window.add({"loss": loss, **aux})
    run.ema.update(run.step)
    run.step += 1
    window.steps += 1


def log_window(run: Run, window: Window) -> dict[str, Any]:
    """The metrics record of the steps since the last log, averaged over ranks; resets the window.

    Collectives on every rank, then host syncs: the loss values first (after which the device is
    idle, so the rest is cheap), then the grad norm, the load statistics and the all-to-all stats."""
    names = sorted(window.sums)
    packed = torch.stack([window.sums[n] for n in names])
    dist.all_reduce(packed)
    load = window.loads.reduced()
    values = (packed / (run.ranks.world_size * window.steps * run.plan.grad_accum)).tolist()  # host sync: logging
    elapsed = window.elapsed()
    record = dict(zip(names, values))
    grad_norm = run.engine.get_global_grad_norm()
    record.update(
        grad_norm=float(grad_norm) if grad_norm is not None else None,  # host sync when DeepSpeed keeps a tensor
        lr=float(run.engine.get_lr()[0]),
        steps_per_s=window.steps / elapsed,
        images_per_s=window.steps * run.plan.global_batch / elapsed,
        **window.loads.summary(load),  # host sync: the load statistics
    )
    if run.ep is not None:
        record.update(expert_parallel_record(run.ep, window.steps, run.device))
    window.reset()
    return record


def num_parameters(module: torch.nn.Module) -> int:
    """Parameters of the model (this rank's experts under expert parallelism), counting ZeRO-3's partitioned ones whole."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters())


def save(run: Run) -> None:
    """A checkpoint of this step (a collective: every rank writes its part), after a free-space check
    that stops every rank with `DiskFull` before anything is written when the disk cannot hold it."""
    began = time.perf_counter()
    run.checkpointer.save(run.step, {"step": run.step, "data": run.loader.state_dict()})
    log.info("Saved the checkpoint of step %d in %.2f s.", run.step, time.perf_counter() - began)


def export(run: Run) -> Optional[Path]:
    """Gather the full weights and EMA one tensor at a time (a collective) and write the export on rank 0;
    router state in the EMA's is calibrated for the EMA's weights (`routers.ema_router_state`). The export
    records its step, the tag it comes from and the VAE with its scale factor (what sampling decodes with)."""
    plan = run.checkpointer.plan
    tag = run.resume_from.tag_dir if run.cfg.run.export_only else plan.checkpoint_dir / tag_for_step(run.step)
    share = ema_start_share(run.step, plan.run_record["ema_decay"], plan.run_record["ema_warmup_steps"])
    record = {"step": run.step, "source_tag": str(tag), "vae": plan.run_record["vae"], "ema_start_share": share}
    return run.checkpointer.export(ema_overrides=ema_router_state(run), record=record)


def _refuse_to_replace_a_newer_export(run: Run) -> None:
    """--export-only never replaces an export of a later step than its checkpoint's unless told to."""
    path = run.checkpointer.plan.export_path
    newer = recorded_step(path)
    if newer is not None and newer > run.step and not run.cfg.run.overwrite:
        raise UserError(
            f"{path} holds step {newer}, later than step {run.step} of {run.resume_from.tag_dir}; pass "
            "--overwrite True to replace it, or --results-dir elsewhere to keep both."
        )


def finish(run: Run, total_steps: int) -> Optional[Path]:
    """Export a finished run (a stopped one is not) and plot its loss curve; returns the export on rank 0."""
    path = export(run) if run.step >= total_steps else None
    if run.is_main:
        config = run.model_config
        plot_loss_curve(
            run.results_dir / "metrics.jsonl",
            run.results_dir / "loss_curve.png",
            title=f"{run.cfg.model.model} {config.moe_shape} ({run.objective_config.objective})",
        )
        if path is not None:
            log.info("Exported %s", path)
    dist.barrier()
    return path


def train(cfg: TrainConfig) -> Optional[Path]:
    """Run (or resume) training as configured; returns the export path on rank 0."""
    run = setup(cfg)
    resume(run)
    announce(run)
    if cfg.run.export_only:
        _refuse_to_replace_a_newer_export(run)
        path = export(run)
        dist.barrier()
        return path

    steps_per_epoch = max(1, run.loader.info.num_samples // run.plan.global_batch)
    total_steps = cfg.run.max_steps if cfg.run.max_steps is not None else cfg.run.epochs * steps_per_epoch
    stop = StopRequest()
    metrics = MetricsWriter(run.results_dir, enabled=run.is_main)
    window = Window(LoadTracker(run.engine.module, run.device))
    run.engine.train()
    # closed on the way out of an error too, so the error's line starts a line of its own
    with tqdm(
        total=total_steps, initial=run.step, disable=not run.is_main, desc="train", dynamic_ncols=True
    ) as progress:
        while run.step < total_steps:
            train_step(run, window)  # no host sync of its own: the device runs ahead
            progress.update(1)
            if run.step % cfg.run.log_every == 0 or run.step == total_steps:
                record = log_window(run, window)  # host sync: waits for the device to finish the window
                metrics.write(run.step, record)
                progress.set_postfix(loss=f"{record['loss']:.4f}")
            stopping = stop.agreed()  # a CPU all-reduce every step: ranks agree, the device is not waited for
            if run.checkpointer.due(run.step) or stopping or run.step == total_steps:
                save(run)  # host sync: weights, EMA and RNG go to disk
            if stopping:
                log.warning("Stopped at step %d after saving a checkpoint; resume with --resume auto.", run.step)
                break
    metrics.close()
    return finish(run, total_steps)
