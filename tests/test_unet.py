"""The denoiser's structure and maths on its own (no official fixtures needed)."""
import math

import pytest
import torch

from diffusionrig_core.errors import InputError
from diffusionrig_core.model import DiffusionRig, ModelConfig
from diffusionrig_core.unet import AttentionBlock, ResBlock, timestep_embedding


def _meta_model(**kw) -> DiffusionRig:
    with torch.device("meta"):
        return DiffusionRig(ModelConfig(**kw))


def _count(model, prefix):
    return sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefix))


@pytest.mark.parametrize(
    "size,keys,unet_keys,unet_params",
    [(256, 712, 590, 133_400_835), (512, 804, 682, 134_753_475), (128, 624, 502, 99_960_067), (64, 534, 412, 96_312_707)],
)
def test_default_models_have_the_official_key_and_parameter_counts(size, keys, unet_keys, unet_params):
    model = _meta_model(image_size=size, channel_mult="")
    sd = model.state_dict()
    assert len(sd) == keys
    assert sum(k.startswith("denoisingUNet.") for k in sd) == unet_keys
    assert _count(model, "denoisingUNet.") == unet_params
    assert _count(model, "encoder.") == 11_209_344
    assert list(sd)[0] == "denoisingUNet.time_embed.0.weight" and list(sd)[-1] == "encoder.fc.bias"


def test_default_256_model_has_42_resblocks_6_attentions_and_20_skip_convs():
    unet = _meta_model().denoisingUNet
    res = [m for m in unet.modules() if isinstance(m, ResBlock)]
    assert len(res) == 42
    assert sum(isinstance(m, AttentionBlock) for m in unet.modules()) == 6
    assert sum(not isinstance(m.skip_connection, torch.nn.Identity) for m in res) == 20


def test_default_512_model_starts_with_64_channels():
    unet = _meta_model(image_size=512, channel_mult="").denoisingUNet
    assert unet.input_blocks[0][0].weight.shape == (64, 12, 3, 3)


def test_middle_block_has_attention_even_without_attention_resolutions():
    unet = _meta_model(attention_resolutions=()).denoisingUNet
    assert isinstance(unet.middle_block[1], AttentionBlock)
    assert sum(isinstance(m, AttentionBlock) for m in unet.modules()) == 1


def test_learn_sigma_gives_six_output_channels():
    unet = _meta_model(learn_sigma=True).denoisingUNet
    assert unet.out[2].weight.shape[0] == 6


def test_timestep_embedding_puts_cosines_first_with_float32_frequencies():
    t = torch.tensor([0, 1, 999])
    emb = timestep_embedding(t, 32)
    freqs = torch.exp(-math.log(10000) * torch.arange(16, dtype=torch.float32) / 16)
    assert torch.equal(emb[:, :16], torch.cos(t[:, None].float() * freqs))
    assert torch.equal(emb[:, 16:], torch.sin(t[:, None].float() * freqs))
    assert timestep_embedding(t, 33).shape == (3, 33)


def test_heads_come_from_num_head_channels_when_given():
    assert AttentionBlock(96, num_heads=1, num_head_channels=32).num_heads == 3
    assert AttentionBlock(96, num_heads=2).num_heads == 2
    with pytest.raises(ValueError):
        AttentionBlock(96, num_head_channels=64)


def _random_attention(c, heads, legacy):
    torch.manual_seed(0)
    block = AttentionBlock(c, heads, legacy_order=legacy)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return block


@pytest.mark.parametrize("channels,heads,legacy", [(96, 1, True), (96, 3, True), (96, 3, False), (512, 1, True)])
def test_fused_attention_equals_reference_attention(channels, heads, legacy):
    # (512 channels in one head: the official default at 16 px, above the flash kernel's 256 limit)
    block = _random_attention(channels, heads, legacy)
    x = torch.randn(2, channels, 8, 8)
    ref = block(x)
    block.use_sdpa = True
    assert torch.allclose(block(x), ref, atol=1e-5)
    assert torch.allclose(block(x.contiguous(memory_format=torch.channels_last)), ref, atol=1e-5)


def test_attention_orders_agree_for_one_head_and_differ_for_several():
    x = torch.randn(1, 64, 4, 4)
    a, b = _random_attention(64, 1, True), _random_attention(64, 1, False)
    assert torch.allclose(a(x), b(x), atol=1e-6)
    a, b = _random_attention(64, 2, True), _random_attention(64, 2, False)
    assert not torch.allclose(a(x), b(x), atol=1e-3)


def test_resblock_applies_time_film_then_latent_film_after_the_out_norm():
    torch.manual_seed(0)
    block = ResBlock(32, 16, 8, dropout=0.0)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x, emb, z = torch.randn(2, 32, 4, 4), torch.randn(2, 16), torch.randn(2, 8)
    h = block.in_layers(x)
    st, bt = block.emb_layers(emb)[..., None, None].chunk(2, dim=1)
    sz, bz = block.cond_emb_layers(z)[..., None, None].chunk(2, dim=1)
    h = block.out_layers[0](h) * (1 + st) + bt
    h = h * (1 + sz) + bz
    expected = x + block.out_layers[1:](h)
    assert torch.allclose(block(x, emb, z), expected, atol=1e-6)
    # the latent goes through SiLU before its Linear
    assert isinstance(block.cond_emb_layers[0], torch.nn.SiLU)


def test_down_and_up_resblocks_resample_by_two():
    x, emb, z = torch.randn(1, 32, 8, 8), torch.randn(1, 16), torch.randn(1, 8)
    assert ResBlock(32, 16, 8, 0.0, down=True)(x, emb, z).shape == (1, 32, 4, 4)
    assert ResBlock(32, 16, 8, 0.0, up=True)(x, emb, z).shape == (1, 32, 16, 16)


def test_tiny_model_forward_shapes_and_x_start_encoding():
    torch.manual_seed(0)
    model = DiffusionRig(ModelConfig.tiny()).eval()
    x0 = torch.rand(2, 3, 64, 64) * 2 - 1
    buffers = torch.rand(2, 9, 64, 64)
    t = torch.tensor([3, 700])
    latent = model.encode(x0)
    assert latent.shape == (2, 64)
    with torch.no_grad():
        eps = model(x0, t, buffers, latent)
        assert eps.shape == (2, 3, 64, 64)
        assert torch.equal(model(x0, t, buffers, x_start=x0), eps)
        assert model(x0, torch.tensor(5), buffers, latent).shape == (2, 3, 64, 64)
    with pytest.raises(InputError):
        model(x0, t, buffers)


def test_config_parses_official_strings_and_round_trips_json():
    cfg = ModelConfig.from_official(image_size=64, channel_mult="1,2,3", attention_resolutions="32,16",
                                    diffusion_steps=1000, noise_schedule="linear", use_checkpoint=False)
    assert cfg.channel_mult == (1, 2, 3) and cfg.attention_resolutions == (32, 16)
    assert cfg.attention_ds == (2, 4)
    assert ModelConfig.from_json(cfg.to_json()) == cfg
    assert ModelConfig.from_official(image_size=512, channel_mult="").channel_mult == (0.5, 1, 1, 2, 2, 4, 4)
    assert ModelConfig.from_official().channel_mult == (1, 1, 2, 2, 4, 4)
    with pytest.raises(InputError):
        ModelConfig.from_official(image_size=96, channel_mult="")
    with pytest.raises(InputError):
        ModelConfig.from_official(not_an_option=1)
    with pytest.raises(InputError):
        ModelConfig(encoder_type="vgg")
