"""Class names for an exported pipeline (`id2label` in model_index.json, as DiTPipeline reads it).

- 10-class models (the built-in digits): "0, zero" ... "9, nine".
- 1000-class models: ImageNet's names as diffusers' own DiT release lists them (the `id2label` of
  facebook/DiT-XL-2-256's model_index.json), taken from the Hugging Face cache or the Hub; without
  either the export goes on without names and says so.
- `--class-names FILE`: a JSON object {id: name} or list of names, for any other model.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

from ..utils.errors import UserError

log = logging.getLogger("dit_moe.diffusers")

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
IMAGENET_LABELS_REPO = "facebook/DiT-XL-2-256"


def digit_names() -> dict[int, str]:
    return {i: f"{i}, {word}" for i, word in enumerate(DIGIT_WORDS)}


def imagenet_names() -> Optional[dict[int, str]]:
    """ImageNet's 1,000 names from diffusers' DiT release, or None when neither cache nor Hub has them."""
    from huggingface_hub import hf_hub_download

    try:
        index = hf_hub_download(IMAGENET_LABELS_REPO, "model_index.json")
    except Exception as err:  # offline, no cache, hub errors: names are optional
        log.warning("ImageNet class names were not exported (%s: %s).", type(err).__name__, err)
        return None
    return {int(key): value for key, value in json.loads(Path(index).read_text())["id2label"].items()}


def names_from_file(path: str, num_classes: int) -> dict[int, str]:
    """A JSON object {id: name} or a list of names, checked against the model's classes."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"--class-names {path} is not a readable JSON file ({err}); pass a JSON object or list.")
    names = dict(enumerate(data)) if isinstance(data, list) else {int(k): str(v) for k, v in data.items()}
    bad = sorted(k for k in names if not 0 <= k < num_classes)
    if bad:
        raise UserError(f"--class-names {path} names classes {bad[:5]} outside the model's 0..{num_classes - 1}.")
    return names


def class_names(source: Optional[str], num_classes: int) -> Optional[dict[int, str]]:
    """`source` "none": no names; a path: that file; None: digits' or ImageNet's by the class count."""
    if source is not None:
        return None if source.lower() == "none" else names_from_file(source, num_classes)
    if num_classes == len(DIGIT_WORDS):
        return digit_names()
    if num_classes == 1000:
        return imagenet_names()
    return None
