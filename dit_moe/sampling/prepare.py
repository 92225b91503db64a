"""The one front door of every sampling tool: a request in, a model ready to sample out.

    prepared = prepare_sampling(SamplingRequest("export.safetensors", options=SamplingOptions(cfg_scale=1.5)))
    images = prepared.sample(prepared.check_labels([0, 1, 2]), seeds=[0, 1, 2])

`prepare_sampling` reads the checkpoint once, resolves the objective (`resolve_objective`:
the one the file records, else `--rf` / `--objective`, else IDDPM), loads the codec, and
checks every flag against the file (architecture, objective, sampler, image size, device
and dtype) before anything is sampled, each mistake stopping with one sentence that says
how to fix it. The grid tool (grid.py), the FID sampler (many.py) and the routing collector
(dit_moe.routing.collect) start here and differ only in what they write.

Choices this step makes for all of them:

- The objective comes from the checkpoint when it records one (our exports and DeepSpeed
  checkpoints); `--rf` / `--objective` must then agree, because sampling a rectified-flow
  model with DDPM gives NaNs (a known DiT-MoE trap). Files without a config (official DiT,
  feizc/DiT-MoE) are IDDPM models unless `--rf True` says they were trained with rectified flow.
- A checkpoint or VAE given by name rather than path (DiT's `DiT-XL-2-256x256.pt`, DiT-MoE's
  `dit_moe_xl_8E2A.pt`, `--vae mse`, a hub id) is fetched once into the standard caches
  (dit_moe.hub); local paths are used as they are.
- `--vae-path` left out means pixel space for 1- and 3-channel models; a latent model
  without it stops with an error rather than guessing a VAE.
- `--dtype bf16|fp16` runs the model under CUDA autocast; on the CPU it stops with an
  error (use fp32) instead of silently changing precision.
- Nothing process-wide changes unless the request says the process is the caller's own: the
  command-line tools set `keep_freed_host_memory=True`, which on the CPU switches glibc's malloc to
  keep freed memory for reuse (dit_moe.utils.host_memory: fewer page faults per step, but the
  process's resident memory stays at its peak until it exits). A notebook or library caller gets
  glibc's defaults unless it asks the same.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field, replace
from typing import Callable, NamedTuple, Optional, Sequence

import torch
from torch import nn

from ..checkpoint import LoadedModel, ObjectiveSource, load_checkpoint_model
from ..cli import DTYPES, default_device
from ..data.vae import PIXEL_SPACE, SD_VAE_SCALE_FACTOR, check_vae_path, is_pixel_space, load_codec
from ..diffusion import Objective, ObjectiveConfig
from ..diffusion.samplers import default_num_steps
from ..hub import resolve_checkpoint, resolve_vae
from ..models import DiT, DiTConfig, preset_name
from ..models.flops import routed_experts_per_token
from ..models.moe import ExpertsPerTokenMeter
from ..models.router_expert_choice import check_calibrated
from ..utils.errors import UserError
from ..utils.host_memory import keep_freed_memory
from ..utils.launch import LaunchEnv
from .images import SampleRun, SamplingOptions, SamplingStats, build_sampling_objective, check_codec, sample_images
from .step_cache import CacheSpec, check_cache

log = logging.getLogger("dit_moe.sampling")

IMAGE_CHANNELS = (1, 3)  # models with these input channels generate pixels
DEFAULT_CFG_SCALE = 1.5  # DiT-MoE's README command (DiT's sample.py uses 4.0)
# DiT-MoE's sample.py samples its flow checkpoints with guidance 7.0 whatever --cfg-scale says.
DIT_MOE_FLOW_CFG_SCALE = 7.0
OBJECTIVE_WORDS = {  # name -> (how it was trained, how it is sampled), for messages
    "iddpm": ("IDDPM (DDPM loss)", "IDDPM (DDPM/DDIM)"),
    "flow": ("rectified flow", "rectified-flow (Euler/Heun)"),
}


@dataclass
class SamplingRequest:
    """What a sampling tool asks for; None leaves the choice to the checkpoint or the objective."""

    ckpt: str | os.PathLike  # anything dit_moe.checkpoint.load_model reads, or a release name (dit_moe.hub)
    vae_path: Optional[str] = None  # AutoencoderKL folder, ema/mse/hub id (dit_moe.hub), "none"; None: pixels if 1/3-ch
    options: SamplingOptions = field(default_factory=SamplingOptions)
    objective: Optional[str] = None  # "iddpm" | "flow" from --objective / --rf, for files without a config
    objective_flag: str = "--objective"  # the flag that set `objective` ("--objective" or "--rf"), for messages
    noise_schedule: Optional[str] = None  # IDDPM schedule of a file that records none (default linear)
    diffusion_steps: Optional[int] = None  # IDDPM training steps of a file that records none (default 1000)
    num_experts_per_tok: Optional[int] = None  # top-k override (feizc/DiT-MoE files do not record it)
    model_name: Optional[str] = None  # --model: must name the checkpoint's preset when given
    num_classes: Optional[int] = None  # --num-classes: must match the checkpoint when given
    image_size: Optional[int] = None  # --image-size: must be what model and codec produce when given
    dtype: str = "fp32"  # a key of dit_moe.cli.DTYPES; bf16/fp16 only on CUDA
    device: Optional[str] = None  # None: this process's GPU when there is one, else the CPU
    # The process is the caller's own (an entry point): on the CPU, apply keep_freed_memory, a process-wide
    # malloc setting with no undo; False (library callers) leaves malloc as it is.
    keep_freed_host_memory: bool = False
    weights: str = "ema"  # "ema" | "raw": which of the file's weight sets to sample (dit_moe.cli.WEIGHTS)


@dataclass
class PreparedSampler:
    """A loaded model with its codec and objective, checked against the request, ready to sample."""

    model: DiT
    codec: nn.Module  # on `device`; decodes the model's outputs to images in [-1, 1]
    objective: Objective
    objective_config: ObjectiveConfig  # what `objective` was built from (recorded, or from the flags)
    objective_source: str  # where the objective came from, for messages and reports
    config_source: str  # "stored": the file holds the model config; "inferred": rebuilt from tensor shapes
    options: SamplingOptions  # as requested, cfg_scale filled in; None sampler / steps mean the objective's defaults
    vae_path: str  # the codec's folder, or "none" for pixel space
    device: torch.device
    dtype: torch.dtype
    stats: SamplingStats = field(default_factory=SamplingStats)  # the cost of every `sample` call so far

    @property
    def config(self) -> DiTConfig:
        return self.model.config

    @property
    def objective_name(self) -> str:
        """ "iddpm" | "flow"."""
        return self.objective_config.objective

    @property
    def sampler(self) -> str:
        return self.options.sampler or self.objective.samplers[0]

    @property
    def num_steps(self) -> int:
        return self.options.num_steps or default_num_steps(
            self.objective_name, self.sampler, self.objective.default_num_steps
        )

    def check_labels(self, labels: Sequence[int], flag: str = "--class-labels") -> list[int]:
        """`labels` as ints, after checking that there is one and that each is a class of this model."""
        labels, last = [int(label) for label in labels], self.config.num_classes - 1
        if not labels:
            raise UserError(f"No class labels were given; pick {flag} from this model's 0..{last}.")
        bad = [label for label in labels if not 0 <= label <= last]
        if bad:
            raise UserError(f"Class labels {bad} are outside this model's 0..{last}; pick {flag} in that range.")
        return labels

    def sample(
        self,
        labels: Sequence[int],
        seeds: Sequence[int],
        progress: bool = False,
        callback: Optional[Callable[[dict], None]] = None,
    ) -> torch.Tensor:
        """Images (N, C, H, W) float32 in [-1, 1] on the CPU, one per (label, seed) (see images.sample_images).
        Expert choice logs the experts per token its thresholds let through (a host sync per call)."""
        with ExpertsPerTokenMeter(self.model) as meter:
            images = self._sample(labels, seeds, progress, callback)
        moe = self.config.moe
        if moe is not None and moe.router == "expert-choice":
            log.info(
                "Expert choice routed %.3f experts per token at sampling (mean over layers and steps; training: %g).",
                meter.mean(),
                routed_experts_per_token(moe),
            )
        return images

    def _sample(self, labels, seeds, progress, callback) -> torch.Tensor:
        run = SampleRun(self.device, self.dtype, progress, self.stats)
        return sample_images(
            self.model, self.codec, labels, seeds, self.options, objective=self.objective, run=run, callback=callback
        )


class ResolvedObjective(NamedTuple):
    """The objective to sample with, its config, where it came from, and the guidance used when none is asked."""

    objective: Objective
    config: ObjectiveConfig
    source: str
    default_cfg_scale: float

    @property
    def name(self) -> str:
        return self.config.objective


def prepare_sampling(request: SamplingRequest) -> PreparedSampler:
    """Load `request.ckpt` once and check the whole request against it; bad input raises one sentence.

    Process-wide settings are left alone unless `request.keep_freed_host_memory` (see the module's docs)."""
    device, dtype = _check_request(request)
    if device.type == "cpu" and request.keep_freed_host_memory:
        keep_freed_memory()
    request = replace(request, vae_path=resolve_vae(request.vae_path))  # names (mse, hub ids): cached folders
    vae_path = PIXEL_SPACE if request.vae_path is None else request.vae_path
    if not is_pixel_space(vae_path):
        check_vae_path(vae_path)  # before the (large) checkpoint is read
    path = resolve_checkpoint(request.ckpt)
    loaded = load_checkpoint_model(path, request.num_experts_per_tok, request.weights == "ema", device)
    config = loaded.model.config
    check_architecture(config, request.model_name, request.num_classes)
    check_calibrated(loaded.model)
    resolved = resolve_objective(loaded, request)
    check_sampler(resolved, request, loaded.config_stored)
    check_cache(CacheSpec.parse(request.options.cache), config)
    warn_if_ema_is_its_start(loaded, request)
    recorded_vae = loaded.run.get("vae")
    request = with_recorded_vae(request, recorded_vae)
    vae_path = PIXEL_SPACE if request.vae_path is None else request.vae_path
    codec = resolve_codec(request.vae_path, config, recorded_vae).to(device)
    check_image_size(request.image_size, config, codec)
    options = request.options
    if options.cfg_scale is None:
        options = dataclasses.replace(options, cfg_scale=resolved.default_cfg_scale)
    return PreparedSampler(
        loaded.model,
        codec,
        resolved.objective,
        resolved.config,
        resolved.source,
        "stored" if loaded.config_stored else "inferred",
        options,
        vae_path,
        device,
        dtype,
    )


def resolve_device(device: Optional[str]) -> torch.device:
    """`device`, or this process's GPU (LOCAL_RANK) when CUDA is available, else the CPU."""
    return torch.device(device) if device else default_device(LaunchEnv.from_environ().local_rank)


def _check_request(request: SamplingRequest) -> tuple[torch.device, torch.dtype]:
    """Checks that need no checkpoint: step count, dtype, device. Returns (device, dtype)."""
    steps = request.options.num_steps
    if steps is not None and steps < 1:
        raise UserError(f"--num-sampling-steps must be at least 1, got {steps}.")
    if request.dtype not in DTYPES:
        raise UserError(f"--dtype {request.dtype} is unknown; use one of {', '.join(sorted(DTYPES))}.")
    device = resolve_device(request.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device} asks for a GPU but CUDA is not available; pass --device cpu.")
    if request.dtype != "fp32" and device.type != "cuda":
        raise UserError(
            f"--dtype {request.dtype} runs the model under CUDA autocast and is not supported on {device.type}; "
            "use --dtype fp32 there, or sample on a GPU."
        )
    return device, DTYPES[request.dtype]


def check_architecture(config: DiTConfig, model_name: Optional[str], num_classes: Optional[int]) -> None:
    """`--model` / `--num-classes` are accepted for DiT's command line; they must describe the checkpoint."""
    found = preset_name(config)
    if model_name is not None and model_name != found:
        held = found or f"non-preset {config.depth}-block, width-{config.hidden_size}, patch-{config.patch_size}"
        fix = f"pass --model {found} or leave --model out" if found else "leave --model out"
        raise UserError(f"--model {model_name} does not match the checkpoint, which holds a {held} model; {fix}.")
    if num_classes is not None and num_classes != config.num_classes:
        raise UserError(
            f"--num-classes {num_classes} does not match the checkpoint's {config.num_classes} classes; "
            "leave --num-classes out."
        )


def _flag_text(flag: str, objective: str) -> str:
    """How the user spells asking for `objective` with `flag`: "--rf True" or "--objective flow"."""
    return f"--rf {objective == 'flow'}" if flag == "--rf" else f"--objective {objective}"


def resolve_objective(loaded: LoadedModel, request: SamplingRequest) -> ResolvedObjective:
    """How the checkpoint is sampled, the only place that decides it:
    - a recorded ObjectiveConfig as it is (schedule flags may only repeat it);
    - a file written before the objective config: its objective and time scale, the request's schedule;
    - a file that records none: --rf / --objective, else its keys (objective_evidence), else it asks for the flag.
    A request contradicting a recorded objective stops, and so do IDDPM schedule options for flow.
    """
    trained_as = loaded.trained_as
    recorded, evidence = trained_as.recorded, trained_as.judged
    asked, flag = request.objective, request.objective_flag
    if recorded is not None and asked is not None and asked != recorded.objective:
        raise UserError(
            f"The checkpoint records that it was trained with {OBJECTIVE_WORDS[recorded.objective][0]} but "
            f"{_flag_text(flag, asked)} asks for {OBJECTIVE_WORDS[asked][1]} sampling, which gives noise or NaNs "
            f"for it; leave {flag} out or pass {_flag_text(flag, recorded.objective)}."
        )
    if recorded is None and evidence is None and asked is None:
        raise UserError(
            f"{request.ckpt} records no objective and its {trained_as.evidence}; say how it was trained with "
            f"{_flag_text(flag, 'flow')} (rectified flow) or {_flag_text(flag, 'iddpm')} (IDDPM)."
        )
    schedule = {
        key: value
        for key, value in (("noise_schedule", request.noise_schedule), ("diffusion_steps", request.diffusion_steps))
        if value is not None
    }
    known = recorded or evidence
    name = known.objective if asked is None else asked
    if name == "flow" and schedule:
        raise UserError(
            "--noise-schedule and --diffusion-steps describe IDDPM models; leave them out for a rectified-flow model."
        )
    if trained_as.source is ObjectiveSource.RECORDED:
        _check_recorded_schedule(recorded, schedule)
        config, source = recorded, "the checkpoint's config"
    else:
        t_scale = known.flow_t_scale if known is not None else ObjectiveConfig.flow_t_scale
        config = ObjectiveConfig(objective=name, flow_t_scale=t_scale, **schedule)
        source = (
            "the checkpoint's config"
            if recorded is not None
            else _flag_text(flag, asked)
            if asked is not None
            else f"the file's keys: {trained_as.evidence}"
        )
        if recorded is None and asked is None:
            log.warning(
                "%s records no objective: sampling it as %s (time scale %g), judged from %s; pass %s to override.",
                request.ckpt,
                OBJECTIVE_WORDS[name][0],
                t_scale,
                trained_as.evidence,
                _flag_text(flag, "iddpm" if name == "flow" else "flow"),
            )
    default_cfg = (
        DIT_MOE_FLOW_CFG_SCALE
        if evidence is not None and evidence.objective == "flow" and asked is None
        else DEFAULT_CFG_SCALE
    )
    return ResolvedObjective(build_sampling_objective(loaded.model.config, config), config, source, default_cfg)


def _check_recorded_schedule(recorded: ObjectiveConfig, schedule: dict) -> None:
    """Schedule flags may repeat what the checkpoint records, never change it."""
    changed = {key: value for key, value in schedule.items() if getattr(recorded, key) != value}
    if changed:
        asked = ", ".join(f"--{key.replace('_', '-')} {value}" for key, value in changed.items())
        held = ", ".join(f"--{key.replace('_', '-')} {getattr(recorded, key)}" for key in changed)
        raise UserError(
            f"The checkpoint records that it was trained with {held}, but {asked} was asked for; sampling with "
            "another schedule than the training one gives wrong images, so leave the flag out."
        )


def check_sampler(resolved: ResolvedObjective, request: SamplingRequest, config_stored: bool) -> None:
    """The requested sampler must be one of the objective's (DDPM/DDIM for IDDPM, Euler/Heun for flow,
    the diffusers solvers for both)."""
    objective, sampler = resolved.objective, request.options.sampler
    if sampler is None or sampler in objective.samplers:
        return
    hint = ""
    if not config_stored and request.objective is None and resolved.name == "iddpm":
        hint = "; if the file was trained with rectified flow, pass --rf True (or --objective flow)"
    raise UserError(
        f"--sampler {sampler} cannot sample {objective.description} (objective from {resolved.source}); "
        f"use --sampler {' or '.join(objective.samplers)}{hint}."
    )


EMA_START_WARNING = 0.5  # the starting weights' share in an EMA above which its samples are mostly noise


def warn_if_ema_is_its_start(loaded: LoadedModel, request: SamplingRequest) -> None:
    """Say so when the EMA about to be sampled is still mostly the weights it started from."""
    share = loaded.run.get("ema_start_share")
    if request.weights == "ema" and share is not None and share > EMA_START_WARNING:
        log.warning(
            "%s: its EMA still holds %.0f%% of the starting weights (step %s), so samples look like an untrained "
            "model's; pass --weights raw to sample the training weights, or train longer.",
            request.ckpt,
            100 * share,
            loaded.run.get("step"),
        )


def with_recorded_vae(request: SamplingRequest, recorded: Optional[dict]) -> SamplingRequest:
    """The request with the VAE an export records when it names none."""
    if request.vae_path is not None or not recorded or is_pixel_space(recorded.get("path")):
        return request
    path = resolve_vae(recorded["path"])
    check_vae_path(path)
    return replace(request, vae_path=path)


def resolve_codec(vae_path: Optional[str], config: DiTConfig, recorded: Optional[dict] = None) -> nn.Module:
    """The codec that turns the model's outputs into images: the VAE at `vae_path` (else the one the
    export records), or pixels for "none" and for a 1/3-channel model when no path is given; latents are
    divided by the scale factor the export records (SD's 0.18215 for files that record none)."""
    scale = recorded.get("scale_factor", SD_VAE_SCALE_FACTOR) if recorded else SD_VAE_SCALE_FACTOR
    latent = config.in_channels not in IMAGE_CHANNELS
    if latent and (vae_path is None or is_pixel_space(vae_path)):
        given = "--vae-path none samples pixels" if vae_path is not None else "no --vae-path was given"
        raise UserError(
            f"This checkpoint generates {config.in_channels}-channel latents but {given}; pass --vae-path DIR "
            "with the diffusers AutoencoderKL it was trained with, or its hub name (e.g. --vae-path mse, DiT's VAE)."
        )
    codec = load_codec(PIXEL_SPACE if vae_path is None else vae_path, scale, channels=config.in_channels)
    check_codec(config, codec)
    return codec


def check_image_size(image_size: Optional[int], config: DiTConfig, codec: nn.Module) -> int:
    """The image side the model and codec produce; `image_size`, when given, must be it."""
    produced = config.input_size * codec.downsample
    if image_size is not None and image_size != produced:
        what = (
            f"{config.input_size}x{config.input_size} latents, which the VAE decodes to {produced}x{produced} pixels"
            if codec.downsample > 1
            else f"{produced}x{produced} images"
        )
        raise UserError(
            f"--image-size {image_size} does not fit this checkpoint: it generates {what}; "
            f"pass --image-size {produced} or leave it out."
        )
    return produced
