"""The exact denoiser of a data set (EmpiricalMixture) and a latent diffusion model sampling
with it in its network's place (ldm.studies.exact_latents)."""

from dataclasses import replace

import pytest
import torch
from torch.utils.data import Subset

from ldm.data.builtin import ShapesDataset
from ldm.data.latents import cache_latents
from ldm.diffusion.analytic import EmpiricalMixture, GaussianMixture
from ldm.diffusion.samplers import make_sampler
from ldm.diffusion.schedules import make_schedule
from ldm.models.conditioners import TransformerTextEncoder
from ldm.models.unet import UNet
from ldm.models.vae import AutoencoderKL
from ldm.studies.exact_latents import use_exact_denoiser
from ldm.training.diffusion import LatentDiffusion


def _as_gaussian_mixture(points, std):
    k = len(points)
    return GaussianMixture(
        torch.full((k,), 1 / k, dtype=torch.float64), points, torch.full_like(points, std)
    )


@pytest.mark.parametrize("alpha_bar", [0.999, 0.5, 0.01, torch.tensor([0.9, 0.2, 0.05])])
def test_posterior_mean_is_the_gaussian_mixtures(alpha_bar):
    g = torch.Generator().manual_seed(0)
    points = torch.randn(40, 6, generator=g, dtype=torch.float64)
    x_t = torch.randn(3, 6, generator=g, dtype=torch.float64)
    fast = EmpiricalMixture(points, 0.3).posterior_mean(x_t, alpha_bar)
    exact = _as_gaussian_mixture(points, 0.3).posterior_mean(x_t, alpha_bar)
    torch.testing.assert_close(fast, exact, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("alpha_bar", [0.5, torch.tensor([0.9, 0.2, 0.05])])
def test_a_single_gaussians_shortcut_is_the_mixture_formula(alpha_bar):
    g = torch.Generator().manual_seed(2)
    mean, std = torch.randn(5, generator=g, dtype=torch.float64), torch.rand(5, generator=g)
    x_t = torch.randn(3, 5, generator=g, dtype=torch.float64)
    one = GaussianMixture.gaussian(mean, std + 0.1)
    halves = GaussianMixture(torch.full((2,), 0.5, dtype=torch.float64), one.means.repeat(2, 1),
                             one.stds.repeat(2, 1))  # fmt: skip
    want = halves.posterior_mean(x_t, alpha_bar)
    torch.testing.assert_close(one.posterior_mean(x_t, alpha_bar), want, rtol=1e-12, atol=1e-12)


def test_a_group_mixes_only_its_own_components():
    g = torch.Generator().manual_seed(1)
    points = torch.randn(30, 4, generator=g, dtype=torch.float64)
    groups = torch.arange(30) % 3
    x_t = torch.randn(4, 4, generator=g, dtype=torch.float64)
    mixture = EmpiricalMixture(points, 0.2, groups)
    out = mixture.posterior_mean(x_t, 0.3, torch.tensor([0, 2, -1, 1]))
    for i, group in enumerate([0, 2, -1, 1]):
        members = points if group < 0 else points[groups == group]
        want = _as_gaussian_mixture(members, 0.2).posterior_mean(x_t[i : i + 1], 0.3)
        torch.testing.assert_close(out[i : i + 1], want, rtol=1e-9, atol=1e-9)


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="need points"):
        EmpiricalMixture(torch.zeros(3), 0.1)
    with pytest.raises(ValueError, match="groups"):
        EmpiricalMixture(torch.zeros(3, 2), 0.1, torch.zeros(2))


CACHE = []  # the fixture's cache root


@pytest.fixture(scope="module")
def model_and_cache(tmp_path_factory):
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("exact") / "latents"
    vae = AutoencoderKL(
        base_channels=8, channel_multipliers=[1, 2], blocks_per_level=1, norm_groups=4,
        mid_attention=False,
    ).eval()  # fmt: skip
    with torch.no_grad():  # a near-deterministic encoder, as a trained one is
        vae.quant_conv.weight[4:] = 0
        vae.quant_conv.bias[4:] = -10
    data = Subset(ShapesDataset("train"), range(24))
    info = cache_latents(data, vae, root / "train", batch_size=8)
    CACHE[:] = [root]
    vae.scale_factor = 1 / info["latent_std"]
    unet = UNet(in_channels=4, out_channels=4, model_channels=16, channel_multipliers=[1],
                attention_levels=[0], context_dim=16, norm_groups=8)  # fmt: skip
    text = TransformerTextEncoder(width=16, depth=1, heads=2, max_length=16)
    module = LatentDiffusion(
        unet,
        text,
        vae,
        schedule=make_schedule("scaled_linear"),
        prediction="v",
        optimizer=None,
        ema_decay=0.999,
        image_size=32,
    )
    captions = [data[i]["caption"] for i in range(len(data))]
    return use_exact_denoiser(module.pipeline(), root), captions


def test_the_exact_model_samples_its_training_latents_for_their_captions(model_and_cache):
    module, captions = model_and_cache
    assert module.conditioner.input_key == "caption"
    mixture = module.denoiser.mixture
    asked = captions[:6]
    with torch.no_grad():
        z = module.generate(asked, make_sampler("ddim", steps=50), guidance_scale=3.0,
                            seeds=range(6), decode=False)  # fmt: skip
        images = module.generate(asked[:2], make_sampler("ddim", steps=5), seeds=[0, 1])
    assert images.shape == (2, 3, 32, 32) and bool(images.abs().le(1).all())
    flat = z.flatten(1).double()
    distances = torch.cdist(flat, mixture.points.double())  # (6, 24)
    for i, caption in enumerate(asked):
        own = torch.tensor([c == caption for c in captions])
        # Each sample lands on a training latent of its own caption (within the mixture's
        # small std), far closer than to any other caption's latents.
        assert distances[i][own].min() < 10 * mixture.std * flat.shape[1] ** 0.5
        assert distances[i][own].min() < 0.2 * distances[i][~own].min()


def test_captions_without_training_latents_are_refused(model_and_cache):
    module, _ = model_and_cache
    with pytest.raises(ValueError, match="no training latent has the caption"):
        module.generate(["a small red circle on the moon"], make_sampler("ddim", steps=2))


def test_a_cache_of_another_size_is_refused(model_and_cache):
    module, _ = model_and_cache
    with pytest.raises(ValueError, match="cache images of the model's size"):
        use_exact_denoiser(replace(module, image_size=(16, 16)), CACHE[0])


def test_a_cache_of_another_vae_is_refused(model_and_cache, tmp_path):
    module, _ = model_and_cache
    other = AutoencoderKL(base_channels=8, channel_multipliers=[1, 2], blocks_per_level=1,
                          norm_groups=4, mid_attention=False).eval()  # fmt: skip
    cache_latents(Subset(ShapesDataset("train"), range(4)), other, tmp_path / "train")
    with pytest.raises(ValueError, match="made with another VAE"):
        use_exact_denoiser(module, tmp_path)
