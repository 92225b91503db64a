"""An independent, functional re-statement of facebookresearch/DiT's forward pass over its state-dict
keys. Used as the oracle that our module tree loads official checkpoints key for key and computes
the same function."""

import math

import torch
import torch.nn.functional as F


def _modulate(x, shift, scale):
    return x * (1 + scale[:, None]) + shift[:, None]


def _timestep_features(t, dim=256, max_period=10000):
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def reference_forward(sd, x, t, y, num_heads, patch):
    lin = lambda h, name: F.linear(h, sd[name + ".weight"], sd[name + ".bias"])  # noqa: E731
    n, _, height, width = x.shape
    tokens = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=patch)
    tokens = tokens.flatten(2).transpose(1, 2) + sd["pos_embed"]
    temb = lin(F.silu(lin(_timestep_features(t), "t_embedder.mlp.0")), "t_embedder.mlp.2")
    c = temb + sd["y_embedder.embedding_table.weight"][y]
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    hidden = tokens.shape[-1]
    head_dim = hidden // num_heads
    for i in range(depth):
        b = f"blocks.{i}."
        mod = lin(F.silu(c), b + "adaLN_modulation.1").chunk(6, dim=1)
        h = _modulate(F.layer_norm(tokens, (hidden,), eps=1e-6), mod[0], mod[1])
        qkv = lin(h, b + "attn.qkv").reshape(n, -1, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1) / math.sqrt(head_dim)).softmax(-1) @ v
        tokens = tokens + mod[2][:, None] * lin(attn.transpose(1, 2).reshape(n, -1, hidden), b + "attn.proj")
        h = _modulate(F.layer_norm(tokens, (hidden,), eps=1e-6), mod[3], mod[4])
        h = lin(F.gelu(lin(h, b + "mlp.fc1"), approximate="tanh"), b + "mlp.fc2")
        tokens = tokens + mod[5][:, None] * h
    shift, scale = lin(F.silu(c), "final_layer.adaLN_modulation.1").chunk(2, dim=1)
    out = lin(_modulate(F.layer_norm(tokens, (hidden,), eps=1e-6), shift, scale), "final_layer.linear")
    grid_h, grid_w = height // patch, width // patch
    channels = out.shape[-1] // (patch * patch)
    out = out.reshape(n, grid_h, grid_w, patch, patch, channels).permute(0, 5, 1, 3, 2, 4)
    return out.reshape(n, channels, height, width)


def randomize_(model, std=0.05):
    """Give every parameter (including the zero-initialised adaLN/output layers) random values."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.normal_(0, std)
    return model
