"""Image <-> model-input codecs: a diffusers `AutoencoderKL` from a local folder, or pixels.

Named VAEs (DiT's `--vae ema|mse`, hub ids) are fetched into a local folder by dit_moe.hub first.

The trainer builds the model for `codec.latent_channels` x `codec.latent_size(image_size)`
inputs and calls `codec.encode(images)` on each batch when the data are images; sampling
calls `codec.decode(latents)`. Latents are the VAE's sample (or mean) multiplied by
`scale_factor` (0.18215 for sd-vae-ft-mse/ema, as in DiT), so the model sees roughly
unit-variance inputs.

Pixel space (`vae_path="none"`) is the identity codec: the model trains on images in
[-1, 1] directly (the built-in digits dataset uses it).
"""

from __future__ import annotations

import json
import os
from typing import Tuple

import torch
from torch import nn

PIXEL_SPACE = "none"
SD_VAE_SCALE_FACTOR = 0.18215


def is_pixel_space(vae_path: str | None) -> bool:
    """True when `vae_path` asks for no VAE (train on pixels)."""
    return vae_path is None or str(vae_path).lower() == PIXEL_SPACE


def check_vae_path(vae_path: str) -> str:
    """Return the path to the VAE's config.json, or raise one clear sentence saying what to put there."""
    config_file = os.path.join(vae_path, "config.json")
    if not os.path.isfile(config_file):
        raise FileNotFoundError(
            f"VAE folder {vae_path!r} does not exist or has no config.json: point --vae-path at a "
            f"diffusers AutoencoderKL folder (config.json + diffusion_pytorch_model.safetensors), name one "
            f"on the Hugging Face Hub (--vae-path mse, or stabilityai/sd-vae-ft-mse), or pass --vae-path none "
            f"to train on pixels."
        )
    return config_file


def vae_geometry(vae_path: str) -> Tuple[int, int]:
    """(latent_channels, downsample) of the VAE at `vae_path`, read from its config without loading weights."""
    with open(check_vae_path(vae_path)) as f:
        config = json.load(f)
    return int(config.get("latent_channels", 4)), 2 ** (len(config.get("block_out_channels", [0] * 4)) - 1)


class PixelCodec(nn.Module):
    """Identity codec: the "latents" are the images themselves, in [-1, 1]."""

    downsample = 1

    def __init__(self, channels: int = 3):
        super().__init__()
        self.channels = channels

    @property
    def latent_channels(self) -> int:
        return self.channels

    def latent_size(self, image_size: int) -> int:
        return image_size

    def encode_distribution(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """A point mass at the image: (images, zeros)."""
        return images, torch.zeros_like(images)

    def encode(self, images: torch.Tensor, sample: bool = True) -> torch.Tensor:
        return images

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents.clamp(-1, 1)


class LatentCodec(nn.Module):
    """A frozen diffusers `AutoencoderKL` with DiT's latent scaling.

    `encode_distribution` returns the unscaled posterior (mean, std): that is what the
    extraction stores, so sampling and scaling stay a load-time choice.
    """

    def __init__(self, vae: nn.Module, scale_factor: float = SD_VAE_SCALE_FACTOR):
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        self.scale_factor = scale_factor

    @classmethod
    def from_pretrained(cls, vae_path: str, scale_factor: float = SD_VAE_SCALE_FACTOR) -> "LatentCodec":
        """Load `AutoencoderKL` from a local folder; never touches the network."""
        from diffusers import AutoencoderKL

        check_vae_path(vae_path)
        return cls(AutoencoderKL.from_pretrained(vae_path, local_files_only=True), scale_factor)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def latent_size(self, image_size: int) -> int:
        if image_size % self.downsample:
            raise ValueError(
                f"Image size {image_size} is not divisible by the VAE's downsampling factor "
                f"{self.downsample}; choose an image size that is a multiple of {self.downsample}."
            )
        return image_size // self.downsample

    @torch.no_grad()
    def encode_distribution(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Unscaled posterior mean and std of `images` in [-1, 1], each (N, C, H/f, W/f)."""
        posterior = self.vae.encode(images).latent_dist
        return posterior.mean, posterior.std

    @torch.no_grad()
    def encode(self, images: torch.Tensor, sample: bool = True) -> torch.Tensor:
        """Scaled latents: a posterior sample (or its mean) times `scale_factor`."""
        mean, std = self.encode_distribution(images)
        latents = mean + std * torch.randn_like(std) if sample else mean
        return latents * self.scale_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] from scaled latents."""
        return self.vae.decode(latents / self.scale_factor).sample.clamp(-1, 1)


def load_codec(vae_path: str | None, scale_factor: float = SD_VAE_SCALE_FACTOR, channels: int = 3) -> nn.Module:
    """`PixelCodec(channels)` for "none", else the `AutoencoderKL` at `vae_path` as a `LatentCodec`."""
    if is_pixel_space(vae_path):
        return PixelCodec(channels)
    return LatentCodec.from_pretrained(vae_path, scale_factor)
