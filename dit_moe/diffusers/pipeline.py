"""Class-conditional sampling of a DiT / DiT-MoE as a diffusers pipeline: `DiTMoEPipeline`.

    pipe = DiffusionPipeline.from_pretrained("exported/", trust_remote_code=True)
    images = pipe(class_labels=[3, 7], num_inference_steps=25, guidance_scale=1.5,
                  generator=[torch.Generator().manual_seed(s) for s in (0, 1)]).images

Like diffusers' DiTPipeline (the same call), with dit-moe's conventions, so that for the same
solver, steps, guidance and initial noise it makes sample.py's images:

- Objective (`objective` in model_index.json): IDDPM models get the scheduler's integer timestep,
  the original-process index; flow models get t * flow_t_scale, where diffusers' flow schedulers
  count t = sigma in timesteps of sigma * num_train_timesteps.
- Steps: a scheduler that takes explicit schedules gets sample.py's: flow sigmas 1, 1 - 1/N, ...,
  1/N (uniform Euler steps, as SD3's pipeline passes them); DDPM timesteps IDDPM's "N" respacing.
  Schedulers without that option (DDIMScheduler, ...) use their own `timestep_spacing`.
- Learned sigma: IDDPM models output [eps, v]; a scheduler with `variance_type="learned_range"`
  receives both (IDDPM's interpolated log-variance), any other only eps. Flow models drop v.
- Guidance: dit-moe's `guided` (all prediction channels, or the first `guidance_channels`, 3 being
  DiT's forward_with_cfg), one batched forward over [cond; uncond], the scheduler stepping the N
  conditional samples only, so a list of N generators gives sample i the noise of seed i at every
  step, as sample.py's per-sample generators do.
"""

import inspect

import numpy as np
import torch
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from ..diffusion.guidance import guided

PIPELINE_OBJECTIVES = ("iddpm", "flow")
DEFAULT_STEPS = {"iddpm": 250, "flow": 50}  # sample.py's defaults per objective
LEARNED_VARIANCE_TYPES = ("learned", "learned_range")
# Schedulers whose step splits [eps, v] by the sample's channels itself; others get eps only
# (DPMSolver's learned_range keeps the first 3 channels, DiT's latent layout).
SPLITTING_SCHEDULERS = ("DDPMScheduler", "DDPMParallelScheduler")


def iddpm_respaced_timesteps(num_train_timesteps: int, num_steps: int) -> list[int]:
    """IDDPM's "N" respacing (`space_timesteps(T, [N])`): N evenly strided indices from 0 to T-1,
    each rounded as the stride accumulates; returned from high to low as a scheduler walks them."""
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"num_inference_steps must lie in 1..{num_train_timesteps}, got {num_steps}.")
    if num_steps == 1:
        return [0]
    stride, position, taken = (num_train_timesteps - 1) / (num_steps - 1), 0.0, []
    for _ in range(num_steps):
        taken.append(round(position))
        position += stride
    return sorted(set(taken), reverse=True)


def uniform_flow_sigmas(num_steps: int) -> np.ndarray:
    """sigma_k = 1 - k / N for k = 0..N-1: the times of sample.py's uniform Euler steps."""
    return np.linspace(1.0, 1.0 / num_steps, num_steps)


class DiTMoEPipeline(DiffusionPipeline):
    """transformer (DiTMoETransformer2DModel), scheduler, an optional vae (None: pixel space), and
    the sampling conventions of the checkpoint it was exported from."""

    model_cpu_offload_seq = "transformer->vae"
    _optional_components = ["vae"]

    def __init__(
        self,
        transformer,
        scheduler,
        vae=None,
        id2label: dict | None = None,
        objective: str = "iddpm",
        flow_t_scale: float = 1.0,
        guidance_channels: int | None = None,
        default_guidance_scale: float = 1.5,
    ):
        super().__init__()
        if objective not in PIPELINE_OBJECTIVES:
            raise ValueError(f"objective must be one of {PIPELINE_OBJECTIVES}, got {objective!r}.")
        self.register_modules(transformer=transformer, scheduler=scheduler, vae=vae)
        self.register_to_config(
            id2label=id2label,
            objective=objective,
            flow_t_scale=flow_t_scale,
            guidance_channels=guidance_channels,
            default_guidance_scale=default_guidance_scale,
        )
        self.labels = {}
        for key, value in (id2label or {}).items():
            for name in str(value).split(","):
                self.labels[name.strip()] = int(key)

    def get_label_ids(self, label) -> list[int]:
        """Class ids of label names (DiTPipeline's `get_label_ids`); `pipe.labels` lists them."""
        names = [label] if isinstance(label, str) else list(label)
        unknown = [name for name in names if name not in self.labels]
        if unknown:
            raise ValueError(f"{unknown} are not class names of this model; pick from pipe.labels.")
        return [self.labels[name] for name in names]

    def _set_schedule(self, num_steps: int, device: torch.device) -> None:
        """The scheduler's timesteps: sample.py's schedule where the scheduler accepts one (module doc)."""
        accepts = set(inspect.signature(self.scheduler.set_timesteps).parameters)
        if self.config.objective == "flow" and "sigmas" in accepts:
            self.scheduler.set_timesteps(sigmas=uniform_flow_sigmas(num_steps), device=device)
        elif self.config.objective == "iddpm" and "timesteps" in accepts:
            steps = iddpm_respaced_timesteps(self.scheduler.config.num_train_timesteps, num_steps)
            self.scheduler.set_timesteps(timesteps=steps, device=device)
        else:
            self.scheduler.set_timesteps(num_steps, device=device)

    def _model_time(self, t: torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
        """The scheduler's timestep as the DiT was trained to see it, (batch,)."""
        t = torch.as_tensor(t, device=device)
        if self.config.objective == "flow":
            t = t.float() / self.scheduler.config.num_train_timesteps * self.config.flow_t_scale
        return t.reshape(()).expand(batch)

    def _denoiser(self, guidance_scale: float, guidance_channels: int | None):
        """fn(x, t, y) -> the transformer's guided output (all its channels)."""
        num_classes = self.transformer.dit_config.num_classes

        def model_fn(x, t, y):
            # The transformer runs in its dtype (torch_dtype=...); the scheduler's arithmetic stays fp32.
            with self.transformer.cache_context("cond_uncond"):  # where enable_cache's hooks keep their state
                return self.transformer(x.to(self.transformer.dtype), t, y).sample.float()

        return guided(model_fn, guidance_scale, null_label=num_classes, cfg_channels=guidance_channels)

    def _step_kwargs(self, generator) -> dict:
        """`generator` for schedulers whose step draws noise (DDPM, DDIM with eta > 0)."""
        return {"generator": generator} if "generator" in inspect.signature(self.scheduler.step).parameters else {}

    def _check_labels(self, class_labels) -> torch.Tensor:
        labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
        last = self.transformer.dit_config.num_classes - 1
        bad = [int(label) for label in labels if not 0 <= int(label) <= last]
        if not len(labels) or bad:
            raise ValueError(f"class_labels must be a non-empty list of ids in 0..{last}; got {bad or 'none'}.")
        return labels

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Model outputs -> images in [0, 1] (N, C, H, W): the VAE's decode, or the pixels themselves."""
        if self.vae is not None:
            latents = latents.to(self.vae.dtype) / self.vae.config.scaling_factor
            latents = self.vae.decode(latents).sample
        return (latents.float().clamp(-1, 1) / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def __call__(
        self,
        class_labels,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        generator=None,
        output_type: str = "pil",
        return_dict: bool = True,
        guidance_channels: int | None = None,
    ):
        """Images of `class_labels` (ids; names via `get_label_ids`).

        `num_inference_steps` defaults to sample.py's (IDDPM 250, flow 50); `guidance_scale` to the
        export's (1 = no guidance); `guidance_channels` to the export's (None: every prediction
        channel). `output_type` "pil", "np" (N, H, W, C) or "pt" (N, C, H, W), values in [0, 1].
        """
        labels = self._check_labels(class_labels)
        device, config = self._execution_device, self.transformer.dit_config
        steps = num_inference_steps or DEFAULT_STEPS[self.config.objective]
        scale = self.config.default_guidance_scale if guidance_scale is None else guidance_scale
        channels = self.config.guidance_channels if guidance_channels is None else guidance_channels
        shape = (len(labels), config.in_channels, config.input_size, config.input_size)
        latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        labels = labels.to(device)
        denoise = self._denoiser(scale, channels)
        learned_variance = (
            type(self.scheduler).__name__ in SPLITTING_SCHEDULERS
            and self.scheduler.config.variance_type in LEARNED_VARIANCE_TYPES
        )
        self._set_schedule(steps, device)
        latents = latents * getattr(self.scheduler, "init_noise_sigma", 1.0)  # 1 for DDPM and flow schedulers
        scale_input = getattr(self.scheduler, "scale_model_input", lambda x, t: x)  # Karras-style schedulers only
        for t in self.progress_bar(self.scheduler.timesteps):
            model_input = scale_input(latents, t)
            output = denoise(model_input, self._model_time(t, len(labels), device), labels)
            if not learned_variance:
                output = output[:, : config.in_channels]  # eps or velocity; learned sigma dropped
            latents = self.scheduler.step(output, t, latents, **self._step_kwargs(generator)).prev_sample
        images = self._decode(latents)
        if output_type != "pt":
            images = images.cpu().permute(0, 2, 3, 1).numpy()
            if output_type == "pil":
                images = self.numpy_to_pil(images)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)
