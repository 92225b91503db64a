"""Named downloads: what a user may name instead of a local path, fetched once into the standard caches.

    resolve_checkpoint("DiT-XL-2-256x256.pt")   # -> $TORCH_HOME/hub/checkpoints/DiT-XL-2-256x256.pt
    resolve_checkpoint("dit_moe_xl_8E2A.pt")    # -> the Hugging Face cache's copy of feizhengcong/DiT-MoE's file
    resolve_vae("mse")                          # -> the HF cache folder of stabilityai/sd-vae-ft-mse
    resolve_checkpoint("results/run/export.safetensors")   # local paths are returned unchanged

An existing local path always wins over a name. Names:

- DiT's released files (`DIT_CHECKPOINTS`, DiT's `download.py` names) come from DiT's server
  (`DIT_BASE_URL`, or the `DIT_MOE_DIT_BASE_URL` environment variable for a mirror) into
  torch's hub cache, `torch.hub.get_dir()/checkpoints`, as torch.hub's own downloads do; a
  copy in DiT's `pretrained_models/` folder (where DiT's sample.py saved it) is used as it is.
  The download shows a progress bar, is written under `NAME.partial` (resumed with an HTTP
  Range request when a run is interrupted, under a file lock so concurrent ranks share one
  download) and is renamed to `NAME` only after its SHA-256 was checked. DiT publishes no
  digests and none could be computed where this was written (no network), so `DIT_CHECKPOINTS`
  holds None for both files until someone online fills it in (`sha256sum` of the official
  files): until then the check is trust on first use. The digest of the first complete download
  is recorded beside it as `NAME.sha256` (sha256sum's format, so `sha256sum -c` re-checks the
  file) and every later download of that name must match it. Complete means the server said the
  length and every byte arrived: a download without a length is never recorded as the truth
  (it is kept only if it is a whole zip archive, torch's format, and a later one records it).
  A file found in the cache is not re-hashed on each use: it was checked before it got its name.
- DiT-MoE's released files (`DIT_MOE_CHECKPOINTS`, the names in its README) and VAEs (DiT's
  `--vae ema|mse`, which mean `stabilityai/sd-vae-ft-ema|mse`, or any hub id `owner/name`)
  are fetched with huggingface_hub's `hf_hub_download` into the Hugging Face cache
  (resumable, with a progress bar, never fetched twice). A VAE is the two files diffusers'
  `AutoencoderKL.from_pretrained(repo_id)` fetches (config.json and the safetensors weights,
  else the .bin), so diffusers finds them cached too; the result is the cached snapshot
  folder, which every codec loader here reads as a local VAE folder.

Offline (`HF_HUB_OFFLINE=1`, or no network) a name that is not cached stops with one sentence
naming the file or repo to fetch and the flag that takes a local path instead.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import re
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from typing import Optional

import torch

from .data.vae import is_pixel_space
from .utils.atomic import write_text
from .utils.errors import UserError

DIT_BASE_URL = "https://dl.fbaipublicfiles.com/DiT/models/"
DIT_BASE_URL_ENV = "DIT_MOE_DIT_BASE_URL"
# DiT's released checkpoints -> SHA-256; None: not known here, the first download's digest is recorded.
DIT_CHECKPOINTS: dict[str, Optional[str]] = {"DiT-XL-2-256x256.pt": None, "DiT-XL-2-512x512.pt": None}
DIT_LOCAL_DIR = "pretrained_models"  # where DiT's download.py saves them, relative to the working directory
DIT_MOE_REPO = "feizhengcong/DiT-MoE"
DIT_MOE_CHECKPOINTS = (
    "dit_moe_s_8E2A.pt",
    "dit_moe_s_16E2A.pt",
    "dit_moe_b_8E2A.pt",
    "dit_moe_xl_8E2A.pt",
    "dit_moe_g_16E2A.pt",
)
DIT_VAES = {"ema": "stabilityai/sd-vae-ft-ema", "mse": "stabilityai/sd-vae-ft-mse"}  # DiT's --vae names
VAE_FILES = ("config.json", "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_CHUNK = 1 << 20
log = logging.getLogger("dit_moe.hub")


def offline() -> bool:
    """True when `HF_HUB_OFFLINE` (or `TRANSFORMERS_OFFLINE`) asks for no network, read at call time."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in ("1", "ON", "YES", "TRUE")


def dit_checkpoint_name(model: str, image_size: int) -> str:
    """DiT's sample.py without --ckpt: `DiT-XL-2-{size}x{size}.pt`, released for DiT-XL/2 at 256 and 512 only."""
    name = f"{model.replace('/', '-')}-{image_size}x{image_size}.pt"
    if name not in DIT_CHECKPOINTS:
        raise UserError(
            f"DiT released weights for DiT-XL/2 at --image-size 256 or 512 only, not {model} at {image_size}; "
            "pass --ckpt FILE to sample another model."
        )
    return name


def resolve_checkpoint(name: str | os.PathLike) -> str:
    """A local path as it is; a DiT release name as DiT's `pretrained_models/NAME` when that exists, else
    its torch-hub cache file; a DiT-MoE release name as its HF cache file (each fetched when absent)."""
    text = os.fspath(name)
    if os.path.exists(text):
        return text
    if text in DIT_CHECKPOINTS:
        local = Path(DIT_LOCAL_DIR) / text
        return str(local if local.is_file() else download_dit_checkpoint(text))
    if text in DIT_MOE_CHECKPOINTS:
        return _hub_file(DIT_MOE_REPO, text, f"DiT-MoE's checkpoint {text}", "--ckpt FILE")
    return text


def resolve_vae(name: Optional[str]) -> Optional[str]:
    """None, "none" and local paths as they are; `ema`/`mse` (DiT's names) or a hub id `owner/name`
    as the Hugging Face cache folder holding that AutoencoderKL (fetched when not cached)."""
    if name is None or is_pixel_space(name) or os.path.exists(name):
        return name
    repo = DIT_VAES.get(name, name)
    if not _HUB_ID.match(repo):
        return name  # neither a name nor a hub id: the codec loader says the folder is missing
    what, local_flag = f"the VAE {repo}", "--vae-path DIR"
    config = _hub_file(repo, VAE_FILES[0], what, local_flag)
    try:
        _hub_file(repo, VAE_FILES[1], what, local_flag, missing_ok=True)
    except FileNotFoundError:
        _hub_file(repo, VAE_FILES[2], what, local_flag)
    return os.path.dirname(config)


def _hub_file(repo: str, filename: str, what: str, local_flag: str, missing_ok: bool = False) -> str:
    """`hf_hub_download(repo, filename)` into the HF cache; failures as one sentence. With `missing_ok`,
    a file the repo does not hold raises FileNotFoundError (the caller tries another)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
    )

    fetch = f"fetch {repo} (e.g. hf download {repo} --local-dir DIR) where there is network and pass {local_flag}"
    try:
        return hf_hub_download(repo, filename, local_files_only=offline())
    except LocalEntryNotFoundError:
        if missing_ok and offline():
            raise FileNotFoundError(filename) from None
        why = "HF_HUB_OFFLINE=1 is set" if offline() else "the Hugging Face Hub cannot be reached"
        raise UserError(f"{_capital(what)} ({filename}) is not in the Hugging Face cache and {why}; {fetch}.") from None
    except RepositoryNotFoundError:
        raise UserError(f"{repo!r} is neither a local path nor a Hugging Face repo; pass {local_flag}.") from None
    except EntryNotFoundError:
        if missing_ok:
            raise FileNotFoundError(filename) from None
        raise UserError(f"{repo} on the Hugging Face Hub holds no {filename}; pass {local_flag}.") from None
    except (HfHubHTTPError, OfflineModeIsEnabled, OSError) as err:
        reason = " ".join(str(err).split())
        raise UserError(f"Downloading {what} ({filename}) failed ({reason}); {fetch}.") from None


def _capital(text: str) -> str:
    return text[:1].upper() + text[1:]


def dit_cache_dir() -> Path:
    """torch.hub's checkpoint cache, where DiT's released weights are kept."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def download_dit_checkpoint(name: str) -> Path:
    """DiT's released file `name` in torch's hub cache, downloaded (or resumed) and checked when absent."""
    from filelock import FileLock

    cache = dit_cache_dir()
    target = cache / name
    cache.mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache / f"{name}.lock")):
        if not target.is_file():
            url = os.environ.get(DIT_BASE_URL_ENV, DIT_BASE_URL).rstrip("/") + "/" + name
            partial = cache / f"{name}.partial"
            if offline():
                raise UserError(
                    f"DiT's checkpoint {name} is not in {cache} and HF_HUB_OFFLINE=1 is set; download {url} "
                    f"where there is network and pass --ckpt FILE (or put it in {cache})."
                )
            length_known = _download(url, partial)
            if not length_known:
                _check_whole_archive(name, url, partial)
            _check_digest(name, partial, target, record_first=length_known)
            os.replace(partial, target)
    return target


def _download(url: str, partial: Path) -> bool:
    """Fetch `url` into `partial` with a progress bar, continuing a partial file with an HTTP Range request.
    Returns whether the server said the length (every byte of which then arrived)."""
    from tqdm import tqdm

    offset = partial.stat().st_size if partial.exists() else 0
    name = partial.name.removesuffix(".partial")
    try:
        with _open(url, offset) as response:
            if response.status != 206:  # the server sent the whole file (no partial, or Range not supported)
                offset = 0
            total = offset + int(response.headers.get("Content-Length") or 0)
            with (
                open(partial, "ab" if offset else "wb") as out,
                tqdm(
                    total=total or None, initial=offset, unit="B", unit_scale=True, unit_divisor=1024, desc=name
                ) as bar,
            ):
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    bar.update(len(chunk))
            if total and partial.stat().st_size != total:
                raise ConnectionError(f"the connection closed after {partial.stat().st_size} of {total} bytes")
    except (OSError, http.client.HTTPException) as err:  # URLError, HTTPError, timeouts, dropped connections
        reason = " ".join(str(getattr(err, "reason", err)).split()) or type(err).__name__
        have = partial.stat().st_size if partial.exists() else 0
        fix = (
            f"run the command again to resume ({have} bytes are kept in {partial})"
            if have
            else f"download it where there is network and pass --ckpt FILE (or put it in {partial.parent})"
        )
        raise UserError(f"Downloading DiT's checkpoint {name} from {url} failed ({reason}); {fix}.") from None
    return bool(total)


def _check_whole_archive(name: str, url: str, partial: Path) -> None:
    """A download whose length the server did not say: keep it only if it is a whole zip archive (torch's
    format ends with the archive's directory, which a cut-off download lacks); else delete it and stop."""
    if zipfile.is_zipfile(partial):
        return
    size = partial.stat().st_size
    partial.unlink()
    raise UserError(
        f"The download of DiT's checkpoint {name} from {url} came without a length and its {size} bytes are not "
        "a whole checkpoint (the connection was probably cut), so it was deleted; run the command again, or "
        "download it yourself and pass --ckpt FILE."
    )


def _open(url: str, offset: int):
    """urlopen from byte `offset`; a partial file longer than the remote one (HTTP 416) is started over."""
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=60)
    except urllib.error.HTTPError as err:
        if err.code != 416 or not offset:
            raise
        return urllib.request.urlopen(url, timeout=60)


def _check_digest(name: str, partial: Path, target: Path, record_first: bool) -> None:
    """Compare the download's SHA-256 with the known one, else with the one recorded by a first download
    (recording it when there is none and `record_first`: the download is known complete); a mismatch
    deletes the download and stops."""
    record = target.with_name(f"{name}.sha256")
    expected = DIT_CHECKPOINTS[name] or (record.read_text().split()[0] if record.is_file() else None)
    digest = sha256_of(partial)
    if expected is None and record_first:
        write_text(record, f"{digest}  {name}\n")
    elif expected is None:
        log.warning(
            "DiT's server sent %s without its length: its SHA-256 %s is not recorded as the one to expect.",
            name,
            digest,
        )
    elif digest != expected:
        partial.unlink()
        raise UserError(
            f"The download of DiT's checkpoint {name} has SHA-256 {digest}, not the expected {expected}, and was "
            f"deleted; run the command again, or download it yourself and pass --ckpt FILE."
        )
