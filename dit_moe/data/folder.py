"""Class-per-sub-folder image dataset (torchvision's ImageFolder layout) with ADM's centre crop."""

from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import List, Tuple

import torch
from PIL import Image
from torch.utils.data import Dataset

from dit_moe.data.transforms import center_crop_arr, flip_coin, hflip, to_tensor

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
MAX_NAMED_SKIPS = 10


def find_classes(root: str) -> List[str]:
    """Sorted class sub-folder names of `root`; raises a clear error if there are none."""
    if not os.path.isdir(root):
        raise FileNotFoundError(
            f"Image folder {root!r} does not exist: pass --data-path a folder with one sub-folder of images per class."
        )
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    if not classes:
        raise FileNotFoundError(
            f"Image folder {root!r} has no class sub-folders: put the images of each class in their own "
            f"sub-folder (root/<class>/<image>.jpg)."
        )
    return classes


def _is_readable(path: str) -> bool:
    """Check `path` (PNG chunk CRCs via verify) and decode it fully; JPEGs at 1/8 scale (draft), which still reads every byte."""
    try:
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            image.draft("RGB", (1, 1))
            image.load()
        return True
    except Exception:  # PIL raises many types for bad files (OSError, SyntaxError, ValueError, ...)
        return False


def _load_rgb(path: str) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


class ImageFolderDataset(Dataset):
    """`root/<class>/<image>` images as (x, y): x (3, image_size, image_size) float in [-1, 1], y the class index.

    Class indices follow sorted class names, like torchvision's ImageFolder. Every file is
    decoded once at index time (threaded); unreadable ones are left out, listed in
    `skipped`, and reported in a single warning. The random flip is decided per sample
    from (seed, epoch, index): call `set_epoch` each epoch.
    """

    def __init__(self, root: str, image_size: int, random_flip: bool = False, seed: int = 0, num_threads: int = 8):
        self.root = root
        self.image_size = image_size
        self.random_flip = random_flip
        self.seed = seed
        self.epoch = 0
        self.classes = find_classes(root)
        candidates = self._list_files()
        with ThreadPoolExecutor(max_workers=num_threads) as pool:
            readable = list(pool.map(_is_readable, [path for path, _ in candidates]))
        self.samples: List[Tuple[str, int]] = [s for s, ok in zip(candidates, readable) if ok]
        self.skipped: List[str] = [path for (path, _), ok in zip(candidates, readable) if not ok]
        if self.skipped:
            named = ", ".join(self.skipped[:MAX_NAMED_SKIPS])
            more = f" and {len(self.skipped) - MAX_NAMED_SKIPS} more" if len(self.skipped) > MAX_NAMED_SKIPS else ""
            warnings.warn(f"Skipped {len(self.skipped)} unreadable image file(s) in {root!r}: {named}{more}.")
        if not self.samples:
            raise FileNotFoundError(
                f"Image folder {root!r} has no readable images ({', '.join(IMAGE_EXTENSIONS)}) in its class "
                f"sub-folders: put the images of each class in root/<class>/."
            )

    def _list_files(self) -> List[Tuple[str, int]]:
        files = []
        for label, name in enumerate(self.classes):
            for dirpath, _, filenames in sorted(os.walk(os.path.join(self.root, name), followlinks=True)):
                files += [
                    (os.path.join(dirpath, f), label) for f in sorted(filenames) if f.lower().endswith(IMAGE_EXTENSIONS)
                ]
        return files

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        try:
            image = _load_rgb(path)
        except Exception as error:
            raise OSError(
                f"Image {path!r} became unreadable after indexing ({error}); remove or replace it."
            ) from error
        x = to_tensor(center_crop_arr(image, self.image_size))
        if self.random_flip and flip_coin(self.seed, self.epoch, index):
            x = hflip(x)
        return x, label
