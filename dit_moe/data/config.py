"""`DataConfig`: which data the trainer reads and how, validated before anything is loaded."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

from dit_moe.data.npy_features import FEATURES_SUFFIX
from dit_moe.data.vae import SD_VAE_SCALE_FACTOR, check_vae_path, is_pixel_space

DATASETS = ("digits", "folder", "latents", "npy")  # and "auto"
DEFAULT_IMAGE_SIZE = {"digits": 32, "folder": 256, "latents": 256, "npy": 256}


def auto_dataset(data_path: Optional[str], features_path: Optional[str]) -> str:
    """The dataset kind that the given paths describe: features (fast-DiT .npy or shards), images, or digits."""
    if features_path:
        has_npy_pairs = os.path.isdir(features_path) and any(
            entry.is_dir() and entry.name.endswith(FEATURES_SUFFIX) for entry in os.scandir(features_path)
        )
        return "npy" if has_npy_pairs else "latents"
    return "folder" if data_path else "digits"


@dataclass
class DataConfig:
    """Training data.

    dataset: "digits" (built-in, pixels), "folder" (class-per-sub-folder images, encoded by
    the VAE on the fly), "latents" (webdataset shards from `python -m dit_moe.data.extract`),
    "npy" (fast-DiT's extract_features.py output), or "auto": chosen from the paths given, so
    that DiT/DiT-MoE command lines (`--data-path` alone, or `--features-path`) mean what they
    meant there, and digits when neither path is given.
    """

    dataset: str = "auto"  # auto|digits|folder|latents|npy (see the class doc); auto: from the paths given
    data_path: Optional[str] = None  # image folder ("folder")
    features_path: Optional[str] = None  # shards ("latents") / fast-DiT folder ("npy"); defaults to data_path
    vae_path: Optional[str] = None  # AutoencoderKL folder, ema|mse or a hub id (fetched), "none": pixels
    image_size: Optional[int] = None  # None: 32 for digits, 256 otherwise
    channels: int = 3  # digits / pixel-space images: 1 (grey) or 3
    num_classes: Optional[int] = None  # None: inferred from the data (required for "npy")
    vae_scale_factor: float = SD_VAE_SCALE_FACTOR  # on-the-fly encoding; latent shards use their manifest's
    random_flip: bool = True  # folder images and latent shards; digits are never mirrored
    num_workers: int = 4  # DataLoader workers (digits are in memory and use none)
    shuffle_buffer: int = 1000  # latent shards: samples held for shuffling per worker
    sample_latents: bool = True  # latent shards: draw from N(mean, std) rather than use the mean
    # Start-up check of extracted features, each rank its share: "full" reads every header, "cached" skips
    # files unchanged (size, mtime) since they passed, "off" none (the readers still stop on a bad file).
    check_data: str = "cached"  # full | cached | off

    def __post_init__(self):
        if self.dataset == "auto":
            self.dataset = auto_dataset(self.data_path, self.features_path)
        if self.dataset not in DATASETS:
            raise ValueError(f"Unknown dataset {self.dataset!r}; choose one of {DATASETS}.")
        if self.dataset in ("latents", "npy") and self.features_path is None:
            self.features_path = self.data_path
        if self.image_size is None:
            self.image_size = DEFAULT_IMAGE_SIZE[self.dataset]
        if self.dataset == "folder" and not self.data_path:
            raise ValueError("The folder dataset needs --data-path: a folder with one sub-folder of images per class.")
        if self.dataset in ("latents", "npy") and not self.features_path:
            raise ValueError(
                f"The {self.dataset} dataset needs --features-path (or --data-path): the extracted features folder."
            )
        if self.dataset == "folder" and self.vae_path is None:
            raise ValueError(
                "The folder dataset needs --vae-path: a local diffusers AutoencoderKL folder to encode images, "
                "or 'none' to train on pixels."
            )
        if self.dataset == "digits" and self.vae_path is None:
            self.vae_path = "none"
        if self.dataset == "npy" and self.num_classes is None:
            raise ValueError("The npy dataset needs --num-classes (fast-DiT's features folder does not record it).")
        if self.image_size < 1:
            raise ValueError(f"image_size must be positive, got {self.image_size}.")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}.")
        if self.vae_scale_factor <= 0:
            raise ValueError(f"vae_scale_factor must be positive, got {self.vae_scale_factor}.")
        if self.num_workers < 0 or self.shuffle_buffer < 0:
            raise ValueError(
                f"num_workers and shuffle_buffer must be >= 0, got {self.num_workers} and {self.shuffle_buffer}."
            )
        if self.check_data not in ("full", "cached", "off"):
            raise ValueError(f"--check-data must be full, cached or off, got {self.check_data!r}.")
        if self.num_classes is not None and self.num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {self.num_classes}.")

    @property
    def pixel_space(self) -> bool:
        return is_pixel_space(self.vae_path)

    def codec_record(self) -> Optional[dict[str, Any]]:
        """The VAE the training latents come from and the factor they were scaled by, for exports and
        sampling; None for a pixel-space run."""
        if self.dataset == "latents":
            from dit_moe.data.shards import Manifest

            manifest = Manifest.load(self.features_path)
            return {"path": manifest.vae_path, "scale_factor": manifest.scale_factor}
        if self.dataset == "npy":  # fast-DiT's extract_features.py stores latents already x 0.18215
            return {"path": self.vae_path, "scale_factor": SD_VAE_SCALE_FACTOR}
        if self.pixel_space:
            return None
        return {"path": self.vae_path, "scale_factor": self.vae_scale_factor}

    @property
    def needs_encoding(self) -> bool:
        """True when batches are images that the trainer must pass through the VAE."""
        return self.dataset in ("digits", "folder") and not self.pixel_space

    def check(self) -> None:
        """Check the paths this config names and every file of its extracted features (one process);
        raises one clear sentence. The trainer runs the two halves itself: `check_paths` before the process
        group starts, `dit_moe.data.check.check_features` after, each rank on its share of the files."""
        from dit_moe.data.check import check_features

        self.check_paths()
        check_features(self)

    def check_paths(self) -> None:
        """Check the folders, manifest and VAE this config names, without reading the data files (cheap)."""
        from dit_moe.data.folder import find_classes
        from dit_moe.data.npy_features import find_feature_dirs
        from dit_moe.data.shards import Manifest

        if self.dataset == "folder":
            find_classes(self.data_path)
        if self.dataset == "latents":
            Manifest.load(self.features_path)
        if self.dataset == "npy":
            find_feature_dirs(self.features_path)
        if not self.pixel_space:
            check_vae_path(self.vae_path)
