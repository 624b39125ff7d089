"""Our AutoencoderKL against diffusers' AutoencoderKL (a test-only oracle), the posterior's
closed forms, latent scaling, tiling, gradient checkpointing and the SD 1.5 size."""

import pytest
import torch
from testutils import randomize

from ldm.convert.diffusers_vae import (
    vae_config_from_diffusers,
    vae_config_to_diffusers,
    vae_from_diffusers,
    vae_to_diffusers,
)
from ldm.models.vae import AutoencoderKL, DiagonalGaussian, tiled

diffusers = pytest.importorskip("diffusers")

DIFFUSERS_CONFIGS = {
    # SD-like: plain encoder / decoder levels, mid-block attention, 4 latent channels.
    "sd-like": dict(
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8,
        latent_channels=4,
    ),
    # Three levels (f = 4), attention inside levels 0 and 2 but not in the middle, two
    # blocks per level, other channel counts, a latent shift.
    "attention-levels": dict(
        block_out_channels=(16, 32, 32),
        layers_per_block=2,
        down_block_types=("AttnDownEncoderBlock2D", "DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
        up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D", "AttnUpDecoderBlock2D"),
        mid_block_add_attention=False,
        norm_num_groups=8,
        latent_channels=3,
        in_channels=1,
        out_channels=2,
        scaling_factor=0.5,
        shift_factor=0.1,
    ),
    # No quant convs (the SD3 / FLUX VAE layout).
    "no-quant-conv": dict(
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8,
        latent_channels=16,
        use_quant_conv=False,
        use_post_quant_conv=False,
    ),
}


def _pair(name):
    cfg = DIFFUSERS_CONFIGS[name]
    reference = randomize(diffusers.AutoencoderKL(**cfg)).eval()
    ours = AutoencoderKL(**vae_config_from_diffusers(reference.config)).eval()
    ours.load_state_dict(vae_from_diffusers(reference.state_dict()), strict=True)
    return cfg, reference, ours


@pytest.mark.parametrize("name", DIFFUSERS_CONFIGS)
def test_converted_diffusers_weights_give_the_same_outputs(name):
    cfg, reference, ours = _pair(name)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, cfg.get("in_channels", 3), 16, 16, generator=g)
    z = torch.randn(2, cfg["latent_channels"], *ours.encode(x).mean.shape[2:], generator=g)
    with torch.no_grad():
        want, got = reference.encode(x).latent_dist, ours.encode(x)
        decoded_want, decoded = reference.decode(z).sample, ours.decode(z)
    for a, b in ((got.mean, want.mean), (got.logvar, want.logvar), (decoded, decoded_want)):
        assert b.abs().max() > 0.1, "a trivially small output would prove nothing"
        assert (a - b).abs().max() < 1e-5
    assert ours.scale_factor == reference.config.scaling_factor
    assert ours.shift_factor == (reference.config.shift_factor or 0.0)

    # Ours -> diffusers layout -> ours is exact, and the export runs in diffusers.
    exported = vae_to_diffusers(ours.state_dict())
    assert set(exported) == set(reference.state_dict())
    back = vae_from_diffusers(exported)
    assert back.keys() == ours.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in ours.state_dict().items())
    rebuilt = diffusers.AutoencoderKL(**vae_config_to_diffusers(ours.config)).eval()
    rebuilt.load_state_dict(exported, strict=True)
    with torch.no_grad():
        assert (rebuilt.decode(z).sample - decoded_want).abs().max() < 1e-5
        assert (rebuilt.encode(x).latent_dist.mean - want.mean).abs().max() < 1e-5


def test_legacy_diffusers_attention_names_load():
    _, reference, ours = _pair("sd-like")
    legacy = {}
    names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    for key, value in reference.state_dict().items():
        for new, old in names.items():
            key = key.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
        legacy[key] = value
    assert any(".query." in k for k in legacy)
    converted = vae_from_diffusers(legacy)
    assert all(torch.equal(converted[k], v) for k, v in ours.state_dict().items())


def test_unknown_keys_and_options_are_refused():
    state = dict(vae_to_diffusers(AutoencoderKL(**_small()).state_dict()))
    state["encoder.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"1 VAE key\(s\) have no counterpart: encoder.extra"):
        vae_from_diffusers(state)
    with pytest.raises(ValueError, match="act_fn='gelu'"):
        vae_config_from_diffusers({"act_fn": "gelu"})


def test_sd_vae_has_the_published_size():
    with torch.device("meta"):
        vae = AutoencoderKL(scale_factor=0.18215)
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863
    assert vae.downsample_factor == 8


def _small(**overrides):
    config = dict(
        base_channels=16,
        channel_multipliers=(1, 2, 2),
        blocks_per_level=1,
        attention_levels=(1,),
        latent_channels=4,
        norm_groups=8,
    )
    return {**config, **overrides}


def test_posterior_matches_torch_distributions():
    moments = torch.randn(3, 8, 4, 4, dtype=torch.float64)
    posterior = DiagonalGaussian(moments)
    normal = torch.distributions.Normal(posterior.mean, posterior.std)
    standard = torch.distributions.Normal(torch.zeros_like(posterior.mean), 1.0)
    kl = torch.distributions.kl_divergence(normal, standard).sum(dim=(1, 2, 3))
    torch.testing.assert_close(posterior.kl(), kl)
    other = DiagonalGaussian(torch.randn(3, 8, 4, 4, dtype=torch.float64))
    to_other = torch.distributions.Normal(other.mean, other.std)
    torch.testing.assert_close(
        posterior.kl(other), torch.distributions.kl_divergence(normal, to_other).sum((1, 2, 3))
    )
    sample = posterior.sample(torch.Generator().manual_seed(0))
    torch.testing.assert_close(posterior.nll(sample), -normal.log_prob(sample).sum((1, 2, 3)))
    assert torch.equal(sample, posterior.sample(torch.Generator().manual_seed(0)))
    assert torch.equal(posterior.mode(), posterior.mean)
    # The log-variance is clamped as in the original, so exp() stays finite.
    huge = DiagonalGaussian(torch.cat([torch.zeros(1, 1, 1, 1), torch.full((1, 1, 1, 1), 1e4)], 1))
    assert torch.isfinite(huge.var).all() and huge.logvar.item() == 20.0


def test_latent_scale_round_trip_and_unset_scale():
    vae = AutoencoderKL(**_small(scale_factor=0.5, shift_factor=0.25))
    z = torch.randn(2, 4, 4, 4)
    torch.testing.assert_close(vae.scale_latents(z), (z - 0.25) * 0.5)
    torch.testing.assert_close(vae.unscale_latents(vae.scale_latents(z)), z)
    vae.scale_factor = 2.0
    assert vae.config["scale_factor"] == 2.0  # checkpoints see the computed value
    with pytest.raises(ValueError, match="no latent scale_factor yet"):
        AutoencoderKL(**_small()).scale_latents(z)


def test_shapes_and_bad_arguments():
    vae = AutoencoderKL(**_small())
    assert vae.downsample_factor == 4
    x = torch.randn(2, 3, 24, 16)
    recon, posterior = vae(x)
    assert recon.shape == x.shape and posterior.mean.shape == (2, 4, 6, 4)
    with pytest.raises(ValueError, match="attention_levels"):
        AutoencoderKL(**_small(attention_levels=(3,)))
    with pytest.raises(ValueError, match="multiples of norm_groups"):
        AutoencoderKL(**_small(norm_groups=32))


def test_gradient_checkpointing_gives_the_same_gradients():
    vae = randomize(AutoencoderKL(**_small(dropout=0.0))).train()
    x = torch.randn(2, 3, 16, 16)

    def grads():
        vae.zero_grad()
        recon, posterior = vae(x, generator=torch.Generator().manual_seed(0))
        (recon.square().mean() + posterior.kl().mean()).backward()
        return {n: p.grad.clone() for n, p in vae.named_parameters()}

    plain = grads()
    vae.gradient_checkpointing = True
    checkpointed = grads()
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_tiling_blends_to_the_exact_result_for_local_functions():
    # A pointwise map, and a 4x upsampling one: blending overlapping tiles must give back
    # exactly the untiled result, however the tiles fall.
    x = torch.randn(2, 3, 40, 56)
    torch.testing.assert_close(tiled(torch.tanh, x, 16, 8, 1, 1, 1), torch.tanh(x))

    def up(t):
        return torch.repeat_interleave(torch.repeat_interleave(t * 2, 4, dim=2), 4, dim=3)

    torch.testing.assert_close(tiled(up, x, 12, 4, 4, 1, 4), up(x))

    def down(t):
        return torch.nn.functional.avg_pool2d(t, 4)

    torch.testing.assert_close(tiled(down, x, 16, 8, 1, 4, 4), down(x))


def test_tiled_vae_matches_untiled_with_one_tile_and_keeps_shapes_with_many():
    vae = AutoencoderKL(**_small(attention_levels=())).eval()
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        whole = vae.encode(x)
        one = vae.encode(x, tile_size=64)
        assert torch.equal(one.mean, whole.mean)
        z = whole.mean
        many = vae.decode(z, tile_size=32, tile_overlap=16)
        assert many.shape == vae.decode(z).shape and torch.isfinite(many).all()
        assert vae.encode(x, tile_size=32).mean.shape == whole.mean.shape
    with pytest.raises(ValueError, match="multiple of 4"):
        vae.encode(x, tile_size=30)
    with pytest.raises(ValueError, match="tile_size 30 must be a multiple of 4"):
        vae.decode(z, tile_size=30)
    with pytest.raises(ValueError, match="smaller than tile_size"):
        vae.encode(x, tile_size=32, tile_overlap=32)
