"""The DeepSpeed JSON, read as DeepSpeed itself reads it (hjson: trailing commas and comments accepted,
duplicate keys refused), without importing DeepSpeed, so a bad file stops the run before the engine
starts. DiT-MoE's own config/zero2.json ends its last entry with a comma: it is read here as there."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hjson

from ..utils.errors import UserError


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """DeepSpeed's rule (deepspeed.runtime.config_utils.dict_raise_error_on_duplicate_keys)."""
    keys = [key for key, _ in pairs]
    repeated = sorted({key for key in keys if keys.count(key) > 1})
    if repeated:
        raise UserError(f"appears more than once: {', '.join(repeated)}")
    return dict(pairs)


def load_deepspeed_config(path: str) -> dict[str, Any]:
    """The DeepSpeed config at `path` as a dict; a missing file or one DeepSpeed would refuse is one sentence."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"DeepSpeed config {path} does not exist; pass one of config/zero*.json.")
    try:
        config = hjson.loads(file.read_text(), object_pairs_hook=_no_duplicate_keys)
    except UserError as err:
        raise UserError(f"DeepSpeed config {path}: the key {err}; keep one of each.") from None
    except hjson.HjsonDecodeError as err:
        raise UserError(
            f"DeepSpeed config {path} is not valid JSON ({err}); fix the file or pass config/zero2.json."
        ) from None
    if not isinstance(config, dict):
        raise UserError(
            f"DeepSpeed config {path} holds a {type(config).__name__}, not a JSON object; see config/zero2.json."
        )
    return config
