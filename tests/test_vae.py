"""The VAE codec (a tiny random AutoencoderKL saved locally) and the pixel-space codec."""

import pytest
import torch

from dit_moe.data.vae import LatentCodec, PixelCodec, load_codec, vae_geometry


def save_tiny_vae(path, blocks=2):
    """A random AutoencoderKL (4 latent channels, downsample 2**(blocks-1)) saved with save_pretrained."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(8,) * blocks,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
    )
    vae.save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="module")
def tiny_vae_path(tmp_path_factory):
    return save_tiny_vae(tmp_path_factory.mktemp("vae"))


def test_latent_codec_shapes_scaling_and_decode(tiny_vae_path):
    codec = load_codec(tiny_vae_path, scale_factor=0.5)
    assert isinstance(codec, LatentCodec)
    assert codec.latent_channels == 4 and codec.downsample == 2 and codec.latent_size(16) == 8
    assert vae_geometry(tiny_vae_path) == (4, 2)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    mean, std = codec.encode_distribution(images)
    assert mean.shape == std.shape == (2, 4, 8, 8) and (std > 0).all()
    torch.testing.assert_close(codec.encode(images, sample=False), mean * 0.5)
    torch.manual_seed(1)
    sampled = codec.encode(images)
    torch.manual_seed(1)
    torch.testing.assert_close(sampled, (mean + std * torch.randn_like(std)) * 0.5)
    decoded = codec.decode(sampled)
    assert decoded.shape == (2, 3, 16, 16) and decoded.abs().max() <= 1
    assert not any(p.requires_grad for p in codec.parameters())
    with pytest.raises(ValueError, match="not divisible"):
        codec.latent_size(15)


def test_pixel_codec_is_identity():
    codec = load_codec("none", channels=1)
    assert isinstance(codec, PixelCodec)
    assert codec.latent_channels == 1 and codec.downsample == 1 and codec.latent_size(32) == 32
    x = torch.rand(2, 1, 8, 8) * 2 - 1
    mean, std = codec.encode_distribution(x)
    assert torch.equal(mean, x) and not std.any()
    assert torch.equal(codec.encode(x), x) and torch.equal(codec.decode(x), x)


def test_missing_vae_path_names_the_path_and_what_to_put_there(tmp_path):
    missing = str(tmp_path / "sd-vae-ft-mse")
    with pytest.raises(FileNotFoundError) as error:
        load_codec(missing)
    message = str(error.value)
    assert missing in message and "AutoencoderKL" in message and "config.json" in message
