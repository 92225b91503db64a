"""dit_moe.hub: named checkpoints and VAEs fetched once into the standard caches, never beyond this machine.

DiT's released files come from a file server on 127.0.0.1 (`DIT_MOE_DIT_BASE_URL`) into a
temporary TORCH_HOME; Hugging Face files come from a pre-filled temporary HF cache, offline.
"""

import hashlib
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dit_moe import hub
from dit_moe.data.vae import LatentCodec, load_codec
from dit_moe.sampling.flags import DIT_ZERO_SETUP, request_from_args
from dit_moe.sampling.grid import build_parser
from dit_moe.train.config import load_config
from dit_moe.utils.errors import UserError
from dit_moe.utils.launch import free_port

from test_vae import save_tiny_vae
from tiny_dit import tiny_model

REPO = Path(__file__).resolve().parents[1]
NAME = "DiT-XL-2-256x256.pt"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FileServer(ThreadingHTTPServer):
    """Serves `files` by name with HTTP Range support; records each request and counts body bytes sent.
    `cut_next` bytes: the next response sends only that much of its body, then drops the connection.
    `no_length`: responses say no Content-Length (HTTP/1.0: the body ends where the connection closes)."""

    def __init__(self, files: dict[str, bytes]):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files, self.requests, self.sent, self.cut_next, self.no_length = files, [], 0, None, False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/DiT/models"

    def hits(self, name: str) -> int:
        return sum(requested == name for requested, _ in self.requests)


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        server, name, ranged = self.server, self.path.rsplit("/", 1)[-1], self.headers.get("Range")
        server.requests.append((name, ranged))
        if name not in server.files:
            self.send_error(404)
            return
        data = server.files[name]
        start = int(ranged.removeprefix("bytes=").rstrip("-")) if ranged else 0
        body = data[start:]
        self.send_response(206 if ranged else 200)
        if not server.no_length:
            self.send_header("Content-Length", str(len(body)))
        if ranged:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        if server.cut_next is not None:
            body, server.cut_next = body[: server.cut_next], None
        self.wfile.write(body)
        server.sent += len(body)

    def log_message(self, *args):
        pass


def _serve(files):
    server = FileServer(files)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture
def dit_server(tmp_path, monkeypatch):
    """A 127.0.0.1 server holding a fake `DiT-XL-2-256x256.pt`, with TORCH_HOME and the base URL pointed at tmp."""
    server = _serve({NAME: os.urandom(3 * 1024 * 1024 + 7)})
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv(hub.DIT_BASE_URL_ENV, server.url)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.chdir(tmp_path)
    yield server
    server.shutdown()
    server.server_close()


def _cache_files():
    return sorted(p.name for p in hub.dit_cache_dir().iterdir() if not p.name.endswith(".lock"))


def test_dit_name_downloads_once_into_torch_hub_cache_with_its_digest_recorded(dit_server):
    path = Path(hub.resolve_checkpoint(NAME))
    data = dit_server.files[NAME]
    assert path == Path(torch.hub.get_dir()) / "checkpoints" / NAME and path.read_bytes() == data
    digest = hashlib.sha256(data).hexdigest()
    assert (path.parent / f"{NAME}.sha256").read_text() == f"{digest}  {NAME}\n"  # sha256sum -c format
    assert _cache_files() == [NAME, f"{NAME}.sha256"]  # no .partial left
    assert hub.resolve_checkpoint(NAME) == str(path) and dit_server.hits(NAME) == 1  # cached: not fetched again


def test_checksum_mismatch_is_refused_and_leaves_no_file_under_the_name(dit_server, monkeypatch):
    monkeypatch.setitem(hub.DIT_CHECKPOINTS, NAME, "0" * 64)
    with pytest.raises(UserError) as error:
        hub.resolve_checkpoint(NAME)
    message = str(error.value)
    assert f"SHA-256 {hashlib.sha256(dit_server.files[NAME]).hexdigest()}, not the expected {'0' * 64}" in message
    assert "\n" not in message and _cache_files() == []


def test_a_later_download_must_match_the_digest_recorded_by_the_first(dit_server):
    first = Path(hub.resolve_checkpoint(NAME))
    first.unlink()  # the cache was cleared, the record kept; the server now sends other bytes
    dit_server.files[NAME] = os.urandom(1024)
    with pytest.raises(UserError, match="has SHA-256 .* not the expected .* was deleted"):
        hub.resolve_checkpoint(NAME)
    assert not first.exists() and _cache_files() == [f"{NAME}.sha256"]


def _checkpoint_bytes(tmp_path) -> bytes:
    """A real torch checkpoint (a zip archive, as DiT's files are) of about 3 MB."""
    torch.save({"pos_embed": torch.randn(768 * 1024)}, tmp_path / "served.pt")
    return (tmp_path / "served.pt").read_bytes()


def test_a_download_without_a_length_is_never_pinned_as_the_truth(dit_server, tmp_path):
    data = _checkpoint_bytes(tmp_path)
    dit_server.files[NAME], dit_server.no_length, dit_server.cut_next = data, True, len(data) // 2
    with pytest.raises(UserError, match="came without a length and its .* bytes are not a whole checkpoint"):
        hub.resolve_checkpoint(NAME)  # cut off, and nothing said how long it should be
    assert _cache_files() == []  # neither kept under the name nor recorded
    path = Path(hub.resolve_checkpoint(NAME))  # whole: used, but its digest is not made the one to expect
    assert path.read_bytes() == data and _cache_files() == [NAME]
    path.unlink()
    dit_server.no_length = False
    assert Path(hub.resolve_checkpoint(NAME)).read_bytes() == data  # a later download with its length is recorded
    assert _cache_files() == [NAME, f"{NAME}.sha256"]


def test_interrupted_download_leaves_no_file_under_the_name_and_resumes(dit_server):
    data = dit_server.files[NAME]
    dit_server.cut_next = len(data) // 3
    with pytest.raises(UserError, match="run the command again to resume") as error:
        hub.resolve_checkpoint(NAME)
    assert "\n" not in str(error.value)
    cache = hub.dit_cache_dir()
    assert not (cache / NAME).exists() and (cache / f"{NAME}.partial").stat().st_size == len(data) // 3
    path = Path(hub.resolve_checkpoint(NAME))
    assert path.read_bytes() == data and not (cache / f"{NAME}.partial").exists()
    assert dit_server.requests[-1] == (NAME, f"bytes={len(data) // 3}-")  # resumed where it stopped
    assert dit_server.sent == len(data)  # every byte crossed the wire once


def test_offline_or_unreachable_says_what_to_fetch_and_the_local_path_flag(dit_server, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError) as error:
        hub.resolve_checkpoint(NAME)
    assert f"{dit_server.url}/{NAME}" in str(error.value) and "--ckpt FILE" in str(error.value)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv(hub.DIT_BASE_URL_ENV, f"http://127.0.0.1:{free_port()}/DiT/models")  # nothing listens
    with pytest.raises(UserError, match=f"Downloading DiT's checkpoint {NAME} from .* failed .*pass --ckpt FILE"):
        hub.resolve_checkpoint(NAME)
    assert dit_server.requests == [] and _cache_files() == []


def test_local_paths_and_dits_pretrained_models_folder_are_used_as_they_are(dit_server, tmp_path):
    (tmp_path / "pretrained_models").mkdir()
    (tmp_path / "pretrained_models" / NAME).write_bytes(b"DiT's download.py put it here")
    assert hub.resolve_checkpoint(NAME) == os.path.join("pretrained_models", NAME)
    (tmp_path / NAME).write_bytes(b"a local file of that name")
    assert hub.resolve_checkpoint(NAME) == NAME
    assert hub.resolve_checkpoint("missing.pt") == "missing.pt"  # not a name: load_model reports it
    assert dit_server.requests == []


def test_dit_zero_setup_names_and_refusals():
    assert hub.dit_checkpoint_name("DiT-XL/2", 512) == "DiT-XL-2-512x512.pt"
    assert hub.dit_checkpoint_name(DIT_ZERO_SETUP["model"], DIT_ZERO_SETUP["image_size"]) == NAME
    with pytest.raises(UserError, match="DiT-XL/2 at --image-size 256 or 512 only, not DiT-B/2 at 256; pass --ckpt"):
        hub.dit_checkpoint_name("DiT-B/2", 256)


def _hf_snapshot(hf_home: Path, repo: str) -> Path:
    """The snapshot folder of `repo` at `COMMIT` in a Hugging Face cache under `hf_home`, `main` pointing at it."""
    root = hf_home / "hub" / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(COMMIT)
    snapshot = root / "snapshots" / COMMIT
    snapshot.mkdir(parents=True, exist_ok=True)
    return snapshot


@pytest.fixture
def hf_home(tmp_path, monkeypatch):
    """An empty HF cache under tmp that this process's huggingface_hub uses, offline."""
    import huggingface_hub.constants

    home = tmp_path / "hf"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home


def test_vae_names_and_hub_ids_resolve_to_the_cached_folder(hf_home, tmp_path):
    snapshot = save_tiny_vae(_hf_snapshot(hf_home, "stabilityai/sd-vae-ft-mse"))
    assert hub.resolve_vae("mse") == hub.resolve_vae("stabilityai/sd-vae-ft-mse") == snapshot
    assert isinstance(load_codec(hub.resolve_vae("mse")), LatentCodec)
    local = save_tiny_vae(tmp_path / "vae")
    assert [hub.resolve_vae(v) for v in (None, "none", local)] == [None, "none", local]
    assert hub.resolve_vae("/no/such/vae") == "/no/such/vae"  # a path, not a name: the codec loader reports it
    with pytest.raises(UserError) as error:
        hub.resolve_vae("ema")
    message = str(error.value)
    assert message.startswith("The VAE stabilityai/sd-vae-ft-ema (config.json) is not in the Hugging Face cache")
    assert "HF_HUB_OFFLINE=1" in message and "--vae-path DIR" in message and "\n" not in message


def test_trainer_vae_flag_takes_dits_names(hf_home):
    snapshot = save_tiny_vae(_hf_snapshot(hf_home, "stabilityai/sd-vae-ft-mse"))
    assert load_config(["--vae", "mse", "--data-path", "/d"]).data.vae_path == snapshot
    assert load_config(["--vae-path", "stabilityai/sd-vae-ft-mse", "--data-path", "/d"]).data.vae_path == snapshot
    assert load_config(["--vae", "/models/vae", "--data-path", "/d"]).data.vae_path == "/models/vae"
    assert load_config(["--vae", "none"]).data.vae_path == "none"
    with pytest.raises(UserError, match="stabilityai/sd-vae-ft-ema .* pass --vae-path DIR"):
        load_config(["--vae", "ema", "--data-path", "/d"])


def test_dit_moe_release_names_come_from_its_hub_repo(hf_home):
    with pytest.raises(UserError, match=f"DiT-MoE's checkpoint dit_moe_s_8E2A.pt .* fetch {hub.DIT_MOE_REPO} .*--ckpt"):
        hub.resolve_checkpoint("dit_moe_s_8E2A.pt")
    cached = _hf_snapshot(hf_home, hub.DIT_MOE_REPO) / "dit_moe_s_8E2A.pt"
    cached.write_bytes(b"weights")
    assert hub.resolve_checkpoint("dit_moe_s_8E2A.pt") == str(cached)


def _sample_py(cwd: Path, env: dict, *argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu", **env}
    return subprocess.run(
        [sys.executable, str(REPO / "sample.py"), *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def test_sample_py_without_ckpt_asks_for_dits_defaults():
    request = request_from_args(build_parser().parse_args([]))
    assert (request.ckpt, request.vae_path, request.options.cfg_scale) == (NAME, "mse", 4.0)
    assert request.options.num_steps is None and request.options.sampler is None  # IDDPM's: ddpm, 250 steps
    assert (request.model_name, request.image_size) == (None, None)  # they chose the file; the file is checked
    big = request_from_args(build_parser().parse_args(["--image-size", "512", "--vae", "ema", "--cfg-scale", "1.5"]))
    assert (big.ckpt, big.vae_path, big.options.cfg_scale, big.image_size) == ("DiT-XL-2-512x512.pt", "ema", 1.5, 512)
    given = request_from_args(build_parser().parse_args(["--ckpt", "run.safetensors"]))
    assert (given.vae_path, given.options.cfg_scale) == (None, None)  # --ckpt: the prepare step decides (1.5 or 7.0)


def test_sample_py_without_ckpt_downloads_dits_model_once_and_samples_a_grid(tmp_path):
    """DiT's zero-setup line: the released name (here a tiny 1000-class latent model) from the server,
    sd-vae-ft-mse from the (pre-filled) HF cache, guidance 4.0, DiT's eight classes; 2 steps to stay quick."""
    torch.manual_seed(0)
    tiny = tmp_path / "tiny.pt"
    torch.save(tiny_model(in_channels=4, input_size=4, num_classes=1000).state_dict(), tiny)  # official layout
    server = _serve({NAME: tiny.read_bytes()})
    save_tiny_vae(_hf_snapshot(tmp_path / "hf", "stabilityai/sd-vae-ft-mse"))  # 4x4 latents -> 8x8 images
    env = {
        "TORCH_HOME": str(tmp_path / "torch"),
        "HF_HOME": str(tmp_path / "hf"),
        hub.DIT_BASE_URL_ENV: server.url,
        "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}",
        "HF_HUB_OFFLINE": "",
    }  # the Hub: unreachable
    try:
        for out in ("sample.png", "again.png"):
            result = _sample_py(tmp_path, env, "--seed", "1", "--num-sampling-steps", "2", "--out", out, "--scale", "1")
            assert result.returncode == 0, result.stderr
            assert (
                "Saved 8 samples (classes 207,360,387,974,88,979,417,279; iddpm, ddpm, 2 steps, cfg 4.0; "
                "4 model evaluations per image"
            ) in result.stdout and result.stdout.rstrip().endswith(f"to {out}")
        grid = np.asarray(Image.open(tmp_path / "sample.png"))
        assert grid.shape == (2 * (8 + 2) + 2, 4 * (8 + 2) + 2, 3)  # DiT's nrow=4 layout of eight 8x8 images
        assert np.array_equal(grid, np.asarray(Image.open(tmp_path / "again.png")))
        assert (tmp_path / "torch" / "hub" / "checkpoints" / NAME).read_bytes() == tiny.read_bytes()
        assert server.hits(NAME) == 1  # the second run used the cache
    finally:
        server.shutdown()
        server.server_close()


def test_sample_py_offline_without_ckpt_exits_2_with_one_sentence(tmp_path):
    save_tiny_vae(_hf_snapshot(tmp_path / "hf", "stabilityai/sd-vae-ft-mse"))
    env = {"TORCH_HOME": str(tmp_path / "torch"), "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    result = _sample_py(tmp_path, env, "--image-size", "512", "--seed", "1")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sample.py: error: DiT's checkpoint DiT-XL-2-512x512.pt")
    assert f"{hub.DIT_BASE_URL}DiT-XL-2-512x512.pt" in lines[0] and "--ckpt FILE" in lines[0]
    empty = _sample_py(tmp_path, {**env, "HF_HOME": str(tmp_path / "empty")})
    assert empty.returncode == 2 and "Traceback" not in empty.stderr and len(empty.stderr.strip().splitlines()) == 1
    assert "stabilityai/sd-vae-ft-mse" in empty.stderr and "--vae-path DIR" in empty.stderr
