"""Masked training (MaskDiT): masks, encoder on visible tokens, decoder, losses, checkpoints."""

import math

import pytest
import torch

from dit_moe.checkpoint import infer_config, load_model, save_export
from dit_moe.diffusion import build_objective
from dit_moe.diffusion.objective import mae_loss, patchify, visible_pixels
from dit_moe.models import DiT, DiTConfig
from dit_moe.models.masking import MaskInfo, drop_tokens, random_mask, restore_tokens
from dit_moe.models.moe import MoEFeedForward

from reference_dit import reference_forward

TINY = dict(
    input_size=8,
    patch_size=2,
    in_channels=4,
    hidden_size=32,
    depth=2,
    num_heads=4,
    num_classes=10,
    num_experts=4,
    num_experts_per_tok=2,
    decoder_depth=2,
    decoder_hidden_size=24,
    decoder_num_heads=4,
)
T = 16  # (8 / 2) ** 2 tokens


def randomized(**overrides) -> DiT:
    """A tiny model with every trainable parameter random (the zero-initialised output layers included)."""
    model = DiT(DiTConfig.from_flat(**{**TINY, **overrides}))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
    return model


def inputs(n=4):
    return torch.randn(n, 4, 8, 8), torch.randint(0, 1000, (n,)).float(), torch.randint(0, 10, (n,))


@pytest.mark.parametrize("ratio, masked", [(0.5, 8), (0.3, 5), (0.75, 12), (0.0, 0)])
def test_random_masks_are_per_sample_with_the_exact_share(ratio, masked):
    info = random_mask(64, T, ratio)
    assert info.mask.shape == (64, T) and info.mask.dtype == torch.bool
    assert (info.mask.sum(dim=1) == round(ratio * T)).all() and masked == round(ratio * T)
    assert info.ids_keep.shape == (64, T - masked)
    kept = torch.ones_like(info.mask).scatter(1, info.ids_keep, False)
    assert torch.equal(kept, info.mask)  # ids_keep are exactly the unmasked tokens
    assert (info.ids_keep.diff(dim=1) > 0).all()  # ascending
    if masked:
        assert len({tuple(row.tolist()) for row in info.mask}) > 50  # samples draw their own masks
        assert info.mask.float().mean(dim=0).min() > 0  # every position gets masked somewhere


def test_random_mask_rejects_bad_ratios_and_uneven_masks():
    with pytest.raises(ValueError, match="ratio"):
        random_mask(2, T, 1.0)
    with pytest.raises(ValueError, match="all 4 tokens"):
        random_mask(2, 4, 0.9)
    uneven = torch.zeros(2, T, dtype=torch.bool)
    uneven[0, 0] = True
    with pytest.raises(ValueError, match="same number"):
        MaskInfo.from_mask(uneven)


def test_restore_inverts_drop_with_mask_tokens_elsewhere():
    info = random_mask(3, T, 0.5)
    tokens = torch.randn(3, T, 5)
    mask_token = torch.randn(5)
    restored = restore_tokens(drop_tokens(tokens, info), info, mask_token)
    assert torch.equal(restored[~info.mask], tokens[~info.mask])
    assert torch.equal(restored[info.mask], mask_token.expand(int(info.mask.sum()), 5))


def test_no_mask_equals_an_all_visible_mask_exactly():
    model = randomized().eval()
    x, t, y = inputs()
    assert torch.equal(model(x, t, y), model(x, t, y, mask=torch.zeros(4, T, dtype=torch.bool)))


def test_without_decoder_the_model_is_the_plain_dit():
    model = randomized(decoder_depth=0, num_experts=0).eval()
    assert not any(k.startswith(("decoder", "mask_token")) for k in model.state_dict())
    x, t, y = inputs(2)
    expected = reference_forward(model.state_dict(), x, t, y, num_heads=4, patch=2)
    torch.testing.assert_close(model(x, t, y), expected, rtol=1e-5, atol=1e-5)
    # Without a decoder, masked patches output zero and visible ones come from the visible tokens only.
    info = random_mask(2, T, 0.5)
    patches = patchify(model(x, t, y, mask=info.mask), 2)  # (N, T, p*p*out)
    assert torch.equal(patches[info.mask], torch.zeros_like(patches[info.mask]))


def test_masked_patches_do_not_reach_visible_encoder_outputs_and_moe_sees_visible_tokens():
    model = randomized().eval()
    x, t, y = inputs(2)
    info = random_mask(2, T, 0.5)
    seen = {}
    model.blocks[-1].register_forward_hook(lambda _m, _i, out: seen.__setitem__("enc", out[0]))
    moe = [m for m in model.modules() if isinstance(m, MoEFeedForward)]
    moe[0].register_forward_hook(lambda _m, args, _o: seen.__setitem__("moe_in", args[0].shape))
    model(x, t, y, mask=info.mask)
    base = seen["enc"]
    assert base.shape == (2, T // 2, 32) and seen["moe_in"] == (2, T // 2, 32)
    assert [int(m.tokens_per_expert.sum()) for m in moe] == [2 * (T // 2) * 2] * len(moe)  # N * T' * top-k

    def perturbed(token: int) -> torch.Tensor:
        row, col = divmod(token, 4)
        bumped = x.clone()
        bumped[0, :, 2 * row : 2 * row + 2, 2 * col : 2 * col + 2] += 5.0
        model(bumped, t, y, mask=info.mask)
        return seen["enc"]

    masked_token = int(info.mask[0].nonzero()[0])
    assert torch.equal(perturbed(masked_token), base)
    visible_token = int(info.ids_keep[0, 0])
    assert not torch.allclose(perturbed(visible_token)[0], base[0])  # the probe is sensitive


@pytest.mark.parametrize("objective", ["iddpm", "flow"])
def test_denoising_loss_has_no_gradient_at_masked_pixels(objective):
    model = randomized()
    obj = build_objective(objective)
    x0 = torch.randn(2, 4, 8, 8, requires_grad=True)
    y = torch.tensor([1, 2])
    info = random_mask(2, T, 0.5)
    pixels_masked = visible_pixels(info.mask, x0.shape).expand_as(x0) == 0

    def grad(mae_weight):
        x0.grad = None
        terms = obj.loss(
            lambda x, t, y: model(x, t, y, mask=info.mask), x0, dict(y=y), mask=info.mask, mae_weight=mae_weight
        )
        terms["loss"].sum().backward()
        return x0.grad

    g = grad(0.0)
    assert torch.count_nonzero(g[pixels_masked]) == 0
    assert torch.count_nonzero(g[~pixels_masked]) == g[~pixels_masked].numel()
    assert torch.count_nonzero(grad(0.1)[pixels_masked]) > 0  # the MAE term reads masked x_t


def test_mae_target_is_the_per_patch_normalised_noisy_input():
    x_t = torch.arange(32, dtype=torch.float32).view(1, 2, 4, 4) ** 1.5 / 10
    prediction = torch.randn(1, 2, 4, 4)
    mask = torch.tensor([[True, False, False, True]])  # patches (0, 0) and (1, 1) masked
    expected = []
    for row, col in ((0, 0), (1, 1)):
        patch = x_t[0, :, 2 * row : 2 * row + 2, 2 * col : 2 * col + 2].flatten().tolist()
        mean = sum(patch) / 8
        var = sum((v - mean) ** 2 for v in patch) / 7  # unbiased, as torch.var / MAE
        target = [(v - mean) / math.sqrt(var + 1e-6) for v in patch]
        pred = prediction[0, :, 2 * row : 2 * row + 2, 2 * col : 2 * col + 2].flatten().tolist()
        expected.append(sum((p - q) ** 2 for p, q in zip(pred, target)) / 8)
    assert mae_loss(x_t, prediction, mask).item() == pytest.approx(sum(expected) / 2, rel=1e-5)


@pytest.mark.parametrize("objective", ["iddpm", "flow"])
def test_objective_terms_average_visible_pixels_and_add_weighted_mae(objective):
    obj = build_objective(objective, learn_sigma=False)
    x0, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    output = torch.randn(2, 4, 8, 8)
    info = random_mask(2, T, 0.5)
    timesteps = obj.timesteps.sample(2, "cpu")
    seen = {}

    def model_fn(x, t, y):
        seen["x_t"] = x
        return output

    terms = obj.loss(model_fn, x0, dict(y=None), noise=noise, timesteps=timesteps, mask=info.mask, mae_weight=0.25)
    target = noise if objective == "iddpm" else noise - x0
    visible = visible_pixels(info.mask, x0.shape).expand_as(x0).bool()
    expected_mse = torch.stack([((target - output)[i][visible[i]] ** 2).mean() for i in range(2)])
    torch.testing.assert_close(terms["mse"], expected_mse)
    torch.testing.assert_close(terms["mae"], mae_loss(seen["x_t"], output, info.mask))
    torch.testing.assert_close(terms["loss"], expected_mse * timesteps[1] + 0.25 * terms["mae"])


def test_a_few_masked_training_steps_on_digits_lower_the_loss():
    from dit_moe.data import digits_arrays

    images, labels = digits_arrays("train", image_size=8, channels=1)
    x_all, y_all = torch.from_numpy(images[:64]), torch.from_numpy(labels[:64])
    model = DiT(DiTConfig.from_flat(**{**TINY, "in_channels": 1}))
    obj = build_objective("iddpm")
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)

    def masked_loss() -> tuple[torch.Tensor, torch.Tensor]:
        """(diffusion loss, MoE aux loss) of the 64 images under fresh timesteps, noise and 50% masks."""
        info = random_mask(64, T, 0.5)
        aux = {}

        def model_fn(x, t, y):
            out, layer_aux = model(x, t, y, return_aux=True, mask=info.mask)
            aux.update(layer_aux)
            return out

        return obj.loss(model_fn, x_all, dict(y=y_all), mask=info.mask)["loss"].mean(), sum(aux.values())

    def held_out() -> float:
        with torch.no_grad(), torch.random.fork_rng():
            torch.manual_seed(1)  # the same draws before and after training
            return masked_loss()[0].item()

    before = held_out()
    for _ in range(25):
        loss, aux = masked_loss()
        opt.zero_grad()
        (loss + aux).backward()
        opt.step()
    assert held_out() < 0.8 * before


@pytest.mark.parametrize("stored_config", [True, False])
def test_masked_model_loads_and_runs_unmasked(tmp_path, stored_config):
    model = randomized(qk_norm=not stored_config).eval()  # bare files: head counts come from q_norm
    if stored_config:
        path = save_export(tmp_path / "export.safetensors", model.config, model.state_dict())
    else:
        path = tmp_path / "bare.pt"
        torch.save(model.state_dict(), path)
        inferred = infer_config(model.state_dict())
        assert (inferred.decoder_depth, inferred.decoder_hidden_size, inferred.decoder_num_heads) == (2, 24, 4)
    loaded = load_model(path)
    x, t, y = inputs(2)
    assert loaded.config.decoder_depth == 2
    assert torch.equal(loaded(x, t, y), model(x, t, y))
