"""Classifier-free guidance as a denoiser wrapper."""

import pytest
import torch

from ldm.diffusion.guidance import cfg, rescale_guidance


class Recorder:
    """A toy conditional network that records its calls."""

    def __init__(self):
        self.batches = []

    def __call__(self, x, t, context=None, y=None):
        self.batches.append(x.shape[0])
        out = x * (1 + t[:, None, None, None] / 1000)
        if context is not None:
            out = out + context.mean(dim=(1, 2))[:, None, None, None]
        if y is not None:
            out = out * (1 + y[:, None, None, None])
        return out


def test_one_batched_forward_equals_two_separate_ones():
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(3, 4, 8, 8, generator=g), torch.tensor([999.0, 500.0, 1.0])
    cond, uncond = torch.randn(3, 7, 16, generator=g), torch.zeros(1, 7, 16)
    model = Recorder()
    guided = cfg(model, cond, uncond, scale=7.5)(x, t)
    assert model.batches == [6], "one forward with the batch doubled"
    out_c, out_u = model(x, t, cond), model(x, t, uncond.expand(3, -1, -1))
    torch.testing.assert_close(guided, out_u + 7.5 * (out_c - out_u))


def test_mapping_conditioning_and_scale_one():
    x, t = torch.randn(2, 1, 4, 4), torch.tensor([10.0, 20.0])
    cond = {"context": torch.randn(2, 5, 8), "y": torch.tensor([1.0, 2.0])}
    uncond = {"context": torch.zeros(2, 5, 8), "y": torch.zeros(2)}
    model = Recorder()
    assert torch.equal(cfg(model, cond, uncond, scale=1.0)(x, t), model(x, t, **cond))
    assert model.batches == [2, 2], "scale 1 skips the unconditional pass"
    guided = cfg(model, cond, uncond, scale=3.0)(x, t)
    expected = model(x, t, **uncond) + 3.0 * (model(x, t, **cond) - model(x, t, **uncond))
    torch.testing.assert_close(guided, expected)


def test_guidance_rescale_follows_lin_et_al():
    g = torch.Generator().manual_seed(1)
    cond_out, uncond_out = (
        torch.randn(4, 3, 8, 8, generator=g),
        torch.randn(4, 3, 8, 8, generator=g),
    )
    guided = uncond_out + 5.0 * (cond_out - uncond_out)
    full = rescale_guidance(guided, cond_out, 1.0)
    torch.testing.assert_close(full.std(dim=(1, 2, 3)), cond_out.std(dim=(1, 2, 3)))
    assert torch.equal(rescale_guidance(guided, cond_out, 0.0), guided)
    # phi = 0.7 mixes the rescaled and the plain guided output (Eq. 16).
    torch.testing.assert_close(rescale_guidance(guided, cond_out, 0.7), 0.7 * full + 0.3 * guided)
    model = lambda x, t, c: c  # noqa: E731  -- returns its conditioning
    x, t = torch.zeros(4, 3, 8, 8), torch.zeros(4)
    out = cfg(model, cond_out, uncond_out, 5.0, rescale=0.7)(x, t)
    torch.testing.assert_close(out, 0.7 * full + 0.3 * guided)


def test_mismatched_conditioning_is_refused():
    model = Recorder()
    x, t = torch.randn(2, 1, 4, 4), torch.zeros(2)
    with pytest.raises(ValueError, match="differ past the batch dimension"):
        cfg(model, torch.randn(2, 7, 8), torch.zeros(2, 5, 8), 3.0)(x, t)
    with pytest.raises(ValueError, match="same fields"):
        cfg(model, {"context": torch.randn(2, 5, 8)}, {"y": torch.zeros(2)}, 3.0)(x, t)
    with pytest.raises(ValueError, match="rescale must be in"):
        cfg(model, None, None, 3.0, rescale=1.5)
