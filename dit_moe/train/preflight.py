"""Every cheap check of a training run's inputs, run before its results folder is claimed.

A run re-started in the folder of an earlier one must hear about its own mistake (a batch split that
does not divide, a missing --data-path, a damaged shard, a DeepSpeed JSON syntax error, an --ep-size
that does not divide the world), not that the folder already holds a run. These checks read flags,
headers and one JSON file and start no process group; per rank they cost the data check (file
headers and sizes, `DataConfig.check`) and one JSON parse, the same on 1 rank or 64.
"""

from __future__ import annotations

from pathlib import Path

from .batch import BatchPlan
from .sections import TrainConfig


def check_inputs(cfg: TrainConfig, world_size: int) -> None:
    """Raise one sentence naming the first bad input among data, --init-from, --resume, the DeepSpeed
    JSON, --ep-size and the batch split (the split only for a fresh run: a resume keeps its checkpoint's)."""
    from . import engine  # imports DeepSpeed, as the run is about to
    from .checkpointer import find_resume

    cfg.data.check_paths()  # the files themselves: each rank its share, once the process group is up
    _check_init_from(cfg)
    find_resume(cfg.run.resume, Path(cfg.run.results_dir))  # a --resume that names no checkpoint stops here
    ds_config = engine.load_deepspeed_config(cfg.run.deepspeed_config)
    engine.check_expert_parallel(cfg.run.ep_size, ds_config, world_size)
    _check_experts_divide(cfg)
    if cfg.run.resume is None:
        BatchPlan.resolve(cfg.run, world_size, ds_config)


def _check_init_from(cfg: TrainConfig) -> None:
    init_from = cfg.model.init_from
    if init_from and not Path(init_from).exists():
        raise FileNotFoundError(f"--init-from {init_from} does not exist; pass a checkpoint file or directory.")


def _check_experts_divide(cfg: TrainConfig) -> None:
    """--ep-size against the flags' expert count (a file given by --init-from is checked once it is read)."""
    ep_size, num_experts = cfg.run.ep_size, getattr(cfg.model, "num_experts", None)
    if ep_size == 1 or cfg.model.init_from or num_experts is None:
        return
    if not num_experts:
        raise ValueError(f"--ep-size {ep_size} needs an MoE model; set --num-experts > 0 or use --ep-size 1.")
    if num_experts % ep_size:
        raise ValueError(f"--ep-size {ep_size} must divide the number of experts ({num_experts}).")
