"""Samplers and guidance on a CUDA device (skipped without one)."""

import pytest
import torch

from ldm.diffusion.analytic import GaussianMixture
from ldm.diffusion.guidance import cfg
from ldm.diffusion.samplers import SAMPLERS
from ldm.diffusion.schedules import make_schedule

pytestmark = pytest.mark.gpu

MIXTURE = GaussianMixture.ring(components=4, radius=2.0, std=0.3)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_cuda_matches_cpu_with_a_cpu_generator(name):
    """Noise comes from the generator's device, so a CPU generator gives the same samples."""
    schedule = make_schedule("scaled_linear", zero_terminal_snr=True)
    model = MIXTURE.denoiser(schedule, "v")
    x_T = torch.randn(512, 2, generator=torch.Generator().manual_seed(0))
    outs = []
    for device in ("cpu", "cuda"):
        g = torch.Generator().manual_seed(1)
        out = SAMPLERS[name](model, x_T.to(device), schedule, steps=20, prediction="v", generator=g)
        assert out.device.type == device and out.dtype == torch.float32
        outs.append(out.cpu())
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_half_precision_state(name, dtype):
    """A half-precision state stays half; timesteps reach the model in float32."""
    schedule = make_schedule("linear")
    exact = MIXTURE.denoiser(schedule, "eps")
    seen = set()

    def model(x, t):
        seen.add((x.dtype, t.dtype))
        return exact(x.float(), t).to(x.dtype)

    x_T = torch.randn(4096, 2, device="cuda", dtype=dtype)
    g = torch.Generator("cuda").manual_seed(0)
    out = SAMPLERS[name](model, x_T, schedule, steps=50, prediction="eps", generator=g)
    assert out.dtype == dtype and bool(torch.isfinite(out).all())
    assert seen == {(dtype, torch.float32)}
    weights = MIXTURE.responsibilities(out.double().cpu()).mean(0)
    assert (weights - MIXTURE.weights).abs().max() < 0.05


def test_guidance_on_cuda():
    def model(x, t, context):
        return x + context.mean(dim=1)[:, None]

    x, t = torch.randn(8, 2, device="cuda"), torch.full((8,), 500.0, device="cuda")
    cond, uncond = torch.randn(8, 3, device="cuda"), torch.zeros(1, 3, device="cuda")
    out = cfg(model, cond, uncond, 4.0)(x, t)
    expected = model(x, t, uncond.expand(8, -1)) + 4.0 * cond.mean(dim=1)[:, None]
    torch.testing.assert_close(out, expected)
