"""The UNet on a CUDA device: bf16 autocast, channels_last, torch.compile (skipped without)."""

import pytest
import torch

from ldm.models.unet import UNet

pytestmark = pytest.mark.gpu

SMALL = dict(
    model_channels=64,
    channel_multipliers=(1, 2, 2),
    blocks_per_level=2,
    attention_levels=(1, 2),
    num_heads=None,
    head_dim=64,
    context_dim=256,
    linear_projection=True,
)


def _inputs(batch=4, side=32):
    g = torch.Generator("cuda").manual_seed(0)
    x = torch.randn(batch, 4, side, side, device="cuda", generator=g)
    t = torch.rand(batch, device="cuda", generator=g) * 999
    context = torch.randn(batch, 77, 256, device="cuda", generator=g)
    return x, t, context


def test_bf16_autocast_matches_fp32():
    torch.manual_seed(0)
    model = UNet(**SMALL).cuda()
    x, t, context = _inputs()
    with torch.no_grad():
        want = model(x, t, context)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            got = model(x, t, context)
    assert got.dtype == torch.bfloat16
    rel = (got.float() - want).norm() / want.norm()
    assert rel < 2e-2, f"relative error {rel:.3g}"
    with torch.autocast("cuda", dtype=torch.bfloat16):
        model(x, t, context).float().square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_channels_last_and_compile_match_eager(monkeypatch):
    # cuDNN's default TF32 convolutions differ between memory formats by ~1e-3; compare
    # the code paths in true fp32.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    torch.manual_seed(0)
    model = UNet(**SMALL).cuda().eval()
    x, t, context = _inputs()
    with torch.no_grad():
        want = model(x, t, context)
        last = model.to(memory_format=torch.channels_last)
        got = last(x.to(memory_format=torch.channels_last), t, context)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        compiled = torch.compile(model)
        torch.testing.assert_close(compiled(x, t, context), want, rtol=1e-4, atol=1e-4)
