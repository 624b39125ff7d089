"""Every model preset in conf/model/ instantiates by name; the tiny one is fast."""

import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

CONF = Path(__file__).resolve().parents[2] / "conf"
PRESETS = sorted((p.parent.name, p.stem) for p in (CONF / "model").glob("*/*.yaml"))
LARGE = {"sd15", "sd21", "sd", "openclip_vit_h", "openclip_vit_l", "mmdit_sd3_medium"}
LARGE |= {f"dit_{size}{patch}" for size in ("b", "l", "xl") for patch in (2, 4, 8)}  # on meta


def _build(kind, name):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name=None, overrides=[f"+model/{kind}={name}"])
    with torch.device("meta" if name in LARGE else "cpu"):
        return instantiate(cfg.model[kind])


@pytest.mark.parametrize(("kind", "name"), PRESETS, ids=[f"{k}-{n}" for k, n in PRESETS])
def test_preset_instantiates(kind, name):
    model = _build(kind, name)
    assert isinstance(model, torch.nn.Module)
    if kind == "backbone":
        assert sum(p.numel() for p in model.parameters()) > 0


def test_sd_presets_have_the_published_sizes():
    sizes = {
        name: sum(p.numel() for p in _build("backbone", name).parameters())
        for name in LARGE & {"sd15", "sd21"}
    }
    assert sizes == {"sd15": 859_520_964, "sd21": 865_910_724}
    vae = _build("vae", "sd")
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863
    assert vae.scale_factor == 0.18215 and vae.downsample_factor == 8


def test_tiny_vae_feeds_the_tiny_unet_and_is_fast():
    vae, unet = _build("vae", "tiny"), _build("backbone", "unet_tiny")
    x = torch.rand(8, 3, 32, 32) * 2 - 1
    recon, posterior = vae(x)  # warm-up
    assert posterior.mean.shape == (8, unet.in_channels, 8, 8)
    start = time.perf_counter()
    recon, posterior = vae(x)
    ((recon - x).abs().mean() + posterior.kl().mean()).backward()
    assert time.perf_counter() - start < 1.0


def test_tiny_unet_forward_backward_is_fast():
    model = _build("backbone", "unet_tiny")
    x, context = torch.randn(8, 4, 8, 8), torch.randn(8, 16, model.context_dim)
    model(x, torch.rand(8) * 999, context).square().mean().backward()  # warm-up
    start = time.perf_counter()
    model(x, torch.rand(8) * 999, context).square().mean().backward()
    assert time.perf_counter() - start < 1.0  # the bound; measured ~0.04 s
