"""Dense DiT backbone: registry, shapes, init, label dropout, attention backends, checkpointing, dtypes."""

import pytest
import torch

from dit_moe.models import MODEL_SIZES, DiT, DiT_models, preset_config
from dit_moe.models.attention import Attention

from reference_dit import reference_forward
from tiny_dit import tiny_config, tiny_model

SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16), "G": (40, 1408, 16)}


def dense_param_count(depth, hidden, patch, in_ch=4, learn_sigma=True, num_classes=1000, input_size=32, ratio=4):
    """Closed-form parameter count of a dense DiT (independent of the module tree)."""
    out_ch = 2 * in_ch if learn_sigma else in_ch
    mlp = int(hidden * ratio)
    embed = hidden * in_ch * patch * patch + hidden
    t_emb = 256 * hidden + hidden + hidden * hidden + hidden
    y_emb = (num_classes + 1) * hidden
    pos = (input_size // patch) ** 2 * hidden
    block = (
        (3 * hidden * hidden + 3 * hidden)
        + (hidden * hidden + hidden)
        + (mlp * hidden + mlp)
        + (hidden * mlp + hidden)
        + (6 * hidden * hidden + 6 * hidden)
    )
    final = hidden * patch * patch * out_ch + patch * patch * out_ch + 2 * hidden * hidden + 2 * hidden
    return embed + t_emb + y_emb + pos + depth * block + final


def test_registry_has_every_dit_and_dit_moe_size():
    expected = {f"DiT-{s}/{p}" for s in ("S", "B", "L", "XL") for p in (2, 4, 8)} | {"DiT-G/2", "DiT-T/2"}
    assert set(DiT_models) == expected
    for size, dims in SIZES.items():
        assert MODEL_SIZES[size] == dims


@pytest.mark.parametrize("name", sorted(DiT_models))
def test_registry_entry_architecture_and_parameter_count(name):
    with torch.device("meta"):
        model = DiT_models[name](input_size=32)
    cfg = model.config
    size, patch = name[4:].split("/")
    depth, hidden, heads = MODEL_SIZES[size]
    assert (cfg.depth, cfg.hidden_size, cfg.num_heads, cfg.patch_size) == (depth, hidden, heads, int(patch))
    assert len(model.blocks) == depth and model.blocks[0].attn.num_heads == heads
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == dense_param_count(depth, hidden, int(patch))


def test_xl2_parameter_count_matches_published_dit():
    with torch.device("meta"):
        model = DiT_models["DiT-XL/2"](input_size=32)
    assert sum(p.numel() for p in model.parameters()) == 675_129_632  # DiT paper / train.py printout


def test_tiny_preset_is_a_few_million_parameters_with_moe():
    model = DiT_models["DiT-T/2"](input_size=32, num_experts=0)
    dense = sum(p.numel() for p in model.parameters())
    assert 1_000_000 < dense < 5_000_000


@pytest.mark.parametrize("learn_sigma", [True, False])
def test_output_shape_and_zero_init(learn_sigma):
    model = DiT(tiny_config(input_size=16, in_channels=3, learn_sigma=learn_sigma))
    x = torch.randn(3, 3, 16, 16)
    out = model(x, torch.tensor([1, 500, 999]), torch.tensor([0, 5, 9]))
    assert out.shape == (3, 6 if learn_sigma else 3, 16, 16)
    assert torch.count_nonzero(out) == 0  # adaLN-Zero: final layer and gates start at zero


def test_label_dropout_and_null_class():
    model = DiT(tiny_config(class_dropout_prob=1.0))
    emb = model.y_embedder
    assert emb.embedding_table.num_embeddings == 11
    labels = torch.arange(10)
    assert torch.equal(emb.token_drop(labels), torch.full((10,), 10))
    forced = emb.token_drop(labels, force_drop_ids=(labels % 2 == 0).long())
    assert torch.equal(forced, torch.where(labels % 2 == 0, 10, labels))
    # eval mode keeps labels; train mode with p=1 replaces all of them by the null row
    assert torch.equal(emb(labels, train=False), emb.embedding_table.weight[:10])
    assert torch.equal(emb(labels, train=True), emb.embedding_table.weight[10].expand(10, -1))
    no_cfg = DiT(tiny_config(class_dropout_prob=0.0))
    assert no_cfg.y_embedder.embedding_table.num_embeddings == 10
    assert torch.equal(no_cfg.y_embedder(labels, train=True), no_cfg.y_embedder.embedding_table.weight)


@pytest.mark.parametrize("qk_norm", [False, True])
def test_sdpa_matches_plain_math_attention(qk_norm):
    sdpa = Attention(64, 4, qk_norm=qk_norm, backend="sdpa")
    math_attn = Attention(64, 4, qk_norm=qk_norm, backend="math")
    math_attn.load_state_dict(sdpa.state_dict())
    x = torch.randn(2, 10, 64)
    torch.testing.assert_close(sdpa(x), math_attn(x), rtol=1e-5, atol=1e-6)


def test_qk_norm_normalises_each_head():
    attn = Attention(64, 4, qk_norm=True)
    assert attn.q_norm.normalized_shape == (16,) and attn.k_norm.normalized_shape == (16,)


def test_flash_backend_without_package_is_a_clear_error():
    with pytest.raises(RuntimeError, match="flash-attn"):
        Attention(64, 4, backend="flash")


def test_matches_reference_dit_forward():
    model = tiny_model(input_size=16)
    x, t, y = torch.randn(2, 4, 16, 16), torch.tensor([3.0, 700.0]), torch.tensor([1, 10])
    expected = reference_forward(model.state_dict(), x, t, y, num_heads=4, patch=2)
    torch.testing.assert_close(model(x, t, y), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_experts", [0, 4])
def test_gradient_checkpointing_gives_same_gradients(num_experts):
    torch.manual_seed(0)
    base = tiny_model(num_experts=num_experts, class_dropout_prob=0.0)
    ckpt = DiT(tiny_config(num_experts=num_experts, class_dropout_prob=0.0, grad_checkpointing=True))
    ckpt.load_state_dict(base.state_dict())
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.tensor([1, 2])
    grads = []
    for model in (base, ckpt):
        model.train()
        out, aux = model(x, t, y, return_aux=True)
        loss = out.square().mean() + sum(aux.values(), torch.zeros(()))
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_runs_in_half_precision(dtype):
    model = tiny_model(num_experts=4)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.tensor([1, 2])
    ref = model(x, t, y)
    out = model.to(dtype)(x.to(dtype), t, y)
    assert out.dtype == dtype and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), ref, rtol=0.1, atol=0.1)


def test_preset_config_rejects_unknown_names_and_bad_sizes():
    with pytest.raises(ValueError, match="Unknown model"):
        preset_config("DiT-XXL/2")
    with pytest.raises(ValueError, match="divisible by patch_size"):
        preset_config("DiT-S/8", input_size=12)
