"""Multi-head self-attention for DiT blocks; the only module that imports flash-attn.

Backends: "sdpa" (torch.nn.functional.scaled_dot_product_attention; on CUDA it picks the
fused kernels itself), "flash" (the flash-attn package, used for fp16/bf16 CUDA tensors,
SDPA otherwise) and "math" (explicit softmax(q k^T / sqrt(d)) v, the reference).
Parameter names follow timm's Attention (`qkv`, `proj`, `q_norm`, `k_norm`); feizc/DiT-MoE's
flash variant (`Wqkv`, `out_proj`) is renamed at load time.
"""

from __future__ import annotations

import importlib.util
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

_FLASH_RENAMES = {"Wqkv.": "qkv.", "out_proj.": "proj."}


def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


class Attention(nn.Module):
    def __init__(
        self, hidden_size: int, num_heads: int, qk_norm: bool = False, backend: str = "sdpa", qk_norm_eps: float = 1e-6
    ):
        super().__init__()
        if backend == "flash" and not flash_attn_available():
            raise RuntimeError(
                "attn_backend='flash' needs the flash-attn package, which is not installed; "
                "install it with `pip install .[gpu]` on a CUDA machine or use attn_backend='sdpa'."
            )
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.backend = backend
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=True)
        self.q_norm = nn.LayerNorm(self.head_dim, eps=qk_norm_eps) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim, eps=qk_norm_eps) if qk_norm else nn.Identity()
        self.proj = nn.Linear(hidden_size, hidden_size, bias=True)
        self._register_load_state_dict_pre_hook(_rename_flash_keys)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, c = x.shape
        qkv = self.qkv(x).reshape(n, t, 3, self.num_heads, self.head_dim)  # (N, T, 3, H, d)
        q, k, v = qkv.unbind(2)  # each (N, T, H, d)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.backend == "flash" and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16):
            from flash_attn import flash_attn_func

            out = flash_attn_func(q, k, v)  # (N, T, H, d)
        else:
            q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # (N, H, T, d)
            if self.backend == "math":
                out = math_attention(q, k, v)
            else:
                out = F.scaled_dot_product_attention(q, k, v)
            out = out.transpose(1, 2)  # (N, T, H, d)
        return self.proj(out.reshape(n, t, c))


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over (N, H, T, d) tensors, softmax in fp32."""
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (N, H, T, T)
    return scores.float().softmax(dim=-1).to(v.dtype) @ v


def _rename_flash_keys(state_dict, prefix, *_args) -> None:
    for key in [k for k in state_dict if k.startswith(prefix)]:
        suffix = key[len(prefix) :]
        for old, new in _FLASH_RENAMES.items():
            if suffix.startswith(old):
                state_dict[prefix + new + suffix[len(old) :]] = state_dict.pop(key)


def flash_layout_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of the load-time rename: QK-norm attention keys (`attn.qkv`, `attn.proj`) under
    DiT-MoE's flash-attention names (`attn.Wqkv`, `attn.out_proj`) for blocks that have `attn.q_norm`."""
    flash_blocks = {key[: -len("q_norm.weight")] for key in state_dict if key.endswith("attn.q_norm.weight")}
    out = {}
    for key, value in state_dict.items():
        prefix = next((p for p in flash_blocks if key.startswith(p)), None)
        if prefix is not None:
            suffix = key[len(prefix) :]
            for new, old in _FLASH_RENAMES.items():
                if suffix.startswith(old):
                    key = prefix + new + suffix[len(old) :]
        out[key] = value
    return out
