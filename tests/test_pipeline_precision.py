"""Pipeline precision: bf16 / fp16 networks between fp32 samplers, the VAE's NaN guard."""

import pytest
import torch
from testutils import TINY_SD_UNET, randomize

from ldm.diffusion.samplers import make_sampler
from ldm.diffusion.schedules import make_schedule
from ldm.models.conditioners import ClassEmbedder
from ldm.models.unet import UNet
from ldm.models.vae import AutoencoderKL
from ldm.pipeline import Pipeline
from ldm.pipeline.pipeline import precision_dtype


def _pipeline() -> Pipeline:
    torch.manual_seed(0)
    unet = UNet(**{**TINY_SD_UNET, "context_dim": 8})
    vae = AutoencoderKL(base_channels=8, channel_multipliers=[1, 2], blocks_per_level=1,
                        attention_levels=[], norm_groups=4, scale_factor=0.5)  # fmt: skip
    return Pipeline(randomize(unet), ClassEmbedder(3, dim=8), randomize(vae, 1),
                    make_schedule("scaled_linear"), image_size=(16, 16)).eval()  # fmt: skip


def _generate(pipeline: Pipeline, **options) -> torch.Tensor:
    return pipeline.generate(torch.tensor([0, 2]), make_sampler("ddim", steps=4), **options)


def test_bf16_networks_sample_like_fp32_with_fp32_integration():
    pipeline = _pipeline()
    reference = _generate(pipeline, guidance_scale=3.0)
    seen = []
    pipeline.denoiser.register_forward_hook(lambda m, args, out: seen.append((args[0], out)))
    pipeline.to(dtype="bf16")
    assert pipeline.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for m in pipeline.modules() for p in m.parameters())
    images = _generate(pipeline, guidance_scale=3.0)
    assert images.dtype == torch.float32 and len(seen) == 4  # one fused CFG batch per step
    assert all(x.dtype == out.dtype == torch.bfloat16 and len(x) == 4 for x, out in seen)
    error = (images - reference).abs()
    assert 0 < error.mean() < 0.02 and error.max() < 0.15  # bf16: ~3 significant digits
    pipeline.to(dtype=torch.float32)  # and back: the fp32 weights are bf16-rounded now
    assert (_generate(pipeline, guidance_scale=3.0) - reference).abs().mean() < 0.02


def test_a_non_finite_low_precision_decode_is_redone_in_fp32(caplog):
    pipeline = _pipeline()
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    reference = pipeline.decode(z)
    pipeline.to(dtype="bf16")

    def overflow(module, args, out):  # what fp16 does in SD's decoder: inf, then NaN
        return out * torch.inf if out.dtype != torch.float32 else None

    pipeline.vae.decoder.register_forward_hook(overflow)
    with caplog.at_level("WARNING"):
        images = pipeline.decode(z)
    assert "decoding again in fp32" in caplog.text and torch.isfinite(images).all()
    fp32 = pipeline._vae_fp32  # a copy of the bf16-rounded weights, in fp32
    assert next(fp32.parameters()).dtype == torch.float32
    torch.testing.assert_close(images, fp32.decode(pipeline.vae.unscale_latents(z)))
    assert (images - reference).abs().mean() < 0.05
    assert next(pipeline.vae.parameters()).dtype == torch.bfloat16  # the pipeline's stays


def test_precision_names():
    assert precision_dtype("bf16") is torch.bfloat16 and precision_dtype("fp32") is torch.float32
    with pytest.raises(ValueError, match=r"precision='half'.*bf16"):
        precision_dtype("half")
