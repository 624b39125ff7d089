"""Original SD single files and diffusers folders, in and out; unsafe and ill-fitting input."""

import pickle

import pytest
import torch

from ldm.convert.stable_diffusion import (
    infer_unet_config,
    infer_vae_config,
    save_diffusers_folder,
    split_checkpoint,
)
from ldm.io import load_into, read_weights, save_safetensors
from ldm.models.unet import UNet
from ldm.models.vae import AutoencoderKL
from ldm.pipeline import open_checkpoint

TINY_SD1 = dict(  # SD 1.x conventions: conv projection, 8 heads
    model_channels=64,
    channel_multipliers=[1, 2],
    blocks_per_level=1,
    attention_levels=[0, 1],
    num_heads=8,
    head_dim=None,
    context_dim=32,
    linear_projection=False,
)
TINY_SD2 = dict(  # SD 2.x conventions: linear projection, 64-wide heads
    model_channels=64,
    channel_multipliers=[1, 2, 2],
    blocks_per_level=2,
    attention_levels=[1, 2],
    num_heads=None,
    head_dim=64,
    context_dim=48,
    linear_projection=True,
)


TINY_VAE = dict(
    base_channels=16,
    channel_multipliers=[1, 2, 2],
    blocks_per_level=1,
    attention_levels=[2],
    latent_channels=4,
    norm_groups=8,
)


def _original_file(tmp_path, unet, kind, vae=None):
    state = {f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()}
    if vae is not None:
        state.update({f"first_stage_model.{k}": v for k, v in vae.state_dict().items()})
    state["alphas_cumprod"] = torch.linspace(0.99, 0.01, 10)
    path = tmp_path / f"model.{kind}"
    if kind == "safetensors":
        save_safetensors(path, state)
    else:  # a Lightning-style pickle: tensors under "state_dict", plus plain metadata
        torch.save({"state_dict": state, "global_step": 10}, path)
    return path


@pytest.mark.parametrize("kind", ["safetensors", "ckpt"])
@pytest.mark.parametrize("config", [TINY_SD1, TINY_SD2], ids=["sd1", "sd2"])
def test_original_single_file_loads(tmp_path, config, kind):
    source, source_vae = UNet(**config), AutoencoderKL(**TINY_VAE)
    path = _original_file(tmp_path, source, kind, source_vae)
    checkpoint = open_checkpoint(path)
    assert checkpoint.format == "stable-diffusion"
    target, target_vae = checkpoint.denoiser(), AutoencoderKL(**TINY_VAE)  # (its groups: 8)
    load_into(target_vae, checkpoint.weights("vae"))
    split = split_checkpoint(checkpoint.tensors)
    assert split.other == ["alphas_cumprod"]
    for model, loaded in ((source, target), (source_vae, target_vae)):
        for key, value in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value), key
    # The UNet's and the VAE's shapes can be read back from the weights alone.
    inferred = infer_unet_config(split.parts["unet"])
    assert {k: inferred[k] for k in config} == config
    # (GroupNorm groups cannot be read from weights: the SD convention, 32, is assumed.)
    assert infer_vae_config(split.parts["vae"]) | {"norm_groups": 8} == source_vae.config


def test_sd15_shape_is_inferred_from_weights():
    with torch.device("meta"):
        sd15 = UNet()
        sd2 = UNet(num_heads=None, head_dim=64, context_dim=1024, linear_projection=True)
        vae = AutoencoderKL()
    for model in (sd15, sd2):
        assert infer_unet_config(model.state_dict()) == model.config
    assert infer_vae_config(vae.state_dict()) == vae.config


class _Exploit:
    def __reduce__(self):
        import os

        return (os.system, ("touch /tmp/ldm_pwned",))


def test_pickle_that_runs_code_is_refused(tmp_path):
    path = tmp_path / "evil.ckpt"
    with path.open("wb") as f:
        pickle.dump({"state_dict": {"w": _Exploit()}}, f, protocol=2)
    with pytest.raises(ValueError, match="could run code, so it is refused"):
        read_weights(path)
    assert not __import__("os").path.exists("/tmp/ldm_pwned")
    with pytest.raises(ValueError, match="not an original Stable Diffusion checkpoint"):
        split_checkpoint({"unet.weight": torch.zeros(1)})


def test_missing_and_unexpected_keys_are_listed():
    model = UNet(**TINY_SD1)
    state = dict(model.state_dict())
    state.pop("out.2.bias")
    state["out.3.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing 1 key\(s\): out.2.bias.*unexpected 1 key"):
        load_into(model, state)
    missing, unexpected = load_into(model, state, strict=False)
    assert missing == ["out.2.bias"] and unexpected == ["out.3.weight"]
    state["out.0.weight"] = torch.zeros(7)
    with pytest.raises(ValueError, match=r"shape mismatch.*out.0.weight: checkpoint \(7,\)"):
        load_into(model, state, strict=False)


def test_diffusers_folder_round_trip(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    ours = UNet(**TINY_SD2).eval()
    vae = AutoencoderKL(**TINY_VAE, scale_factor=0.3).eval()
    save_diffusers_folder(tmp_path / "pipe", denoiser=ours, vae=vae)
    theirs = diffusers.UNet2DConditionModel.from_pretrained(tmp_path / "pipe" / "unet").eval()
    x, t, context = torch.randn(1, 4, 16, 16), torch.tensor([500.0]), torch.randn(1, 3, 48)
    with torch.no_grad():
        want = ours(x, t, context)
        torch.testing.assert_close(
            theirs(x, t, encoder_hidden_states=context).sample, want, rtol=0, atol=1e-5
        )
    their_vae = diffusers.AutoencoderKL.from_pretrained(tmp_path / "pipe" / "vae").eval()
    image = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(
            their_vae.encode(image).latent_dist.mean, vae.encode(image).mean, rtol=0, atol=1e-5
        )
    assert their_vae.config.scaling_factor == 0.3
    loaded = open_checkpoint(tmp_path / "pipe")
    for model, back in ((ours, loaded.denoiser()), (vae, loaded.vae())):
        assert back.config == model.config
        assert all(torch.equal(back.state_dict()[k], v) for k, v in model.state_dict().items())


def test_our_pipeline_draws_diffusers_image_from_the_same_weights(tmp_path, monkeypatch):
    """Prompt to image end to end — CLIP tokenizer and text tower, classifier-free guidance,
    DDIM trailing steps, VAE decode — ours and diffusers' StableDiffusionPipeline on the
    same tiny SD-layout weights and starting noise (benchmarks/gpu.py builds both)."""
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    from pathlib import Path

    monkeypatch.syspath_prepend(Path(__file__).resolve().parents[2] / "benchmarks")
    import gpu  # benchmarks/gpu.py, with its sibling modules

    nets, cpu = gpu.Networks(tiny=True), torch.device("cpu")
    g = torch.Generator().manual_seed(0)
    for state in (nets.unet, nets.vae, nets.hf_text.state_dict()):  # no zero-init layer left
        for value in state.values():
            if value.is_floating_point():
                value.add_(0.05 * torch.randn(value.shape, generator=g))
    theirs = gpu._sampler("diffusers", nets, {"dtype": "fp32"}, cpu, tmp_path, steps=10)()
    ours = gpu._sampler("ours", nets, {"dtype": "fp32"}, cpu, tmp_path, steps=10)()
    assert ours.shape == theirs.shape == (1, 3, 32, 32) and ours.std() > 0.05
    torch.testing.assert_close(ours, theirs, rtol=0, atol=2e-3)
