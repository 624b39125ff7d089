"""EDM (Karras et al. 2022): the noise levels, the preconditioning and the loss weighting
against the paper's Table 1, log-normal training noise, and Algorithm 2 (Heun with churn)
written out from the paper against ``heun`` on the exact denoiser."""

import math

import pytest
import torch

from ldm.diffusion.analytic import GaussianMixture
from ldm.diffusion.objective import (
    EDM_SIGMA_DATA,
    convert,
    diffusion_loss,
    model_input,
    q_sample,
    target,
)
from ldm.diffusion.samplers import make_sampler
from ldm.diffusion.schedules import (
    EDMSchedule,
    c_noise,
    karras_sigmas,
    make_schedule,
    training_timesteps,
)

GAUSSIAN = GaussianMixture.gaussian(torch.tensor([0.3, -0.2]), torch.tensor([0.5, 0.25]))
SIGMAS = torch.tensor([0.002, 0.05, 0.5, 1.0, 7.0, 80.0], dtype=torch.float64)


def test_noise_levels_span_the_papers_range_log_linearly():
    schedule = make_schedule("edm")
    assert isinstance(schedule, EDMSchedule) and not schedule.zero_terminal_snr
    assert schedule.sigmas[0] == pytest.approx(0.002) and schedule.sigmas[-1] == pytest.approx(80)
    t = schedule.sigma_to_t(SIGMAS)
    assert torch.allclose(schedule.sigma(t), SIGMAS, rtol=1e-12)
    assert torch.allclose(schedule.alphas_cumprod_at(t), 1 / (1 + SIGMAS**2), rtol=1e-12)
    assert schedule.alphas_cumprod_at(torch.tensor(-1.0)) == 1  # the clean data
    # The network's time input is affine in c_noise = log(sigma) / 4.
    slope = torch.diff(t) / torch.diff(c_noise(SIGMAS))
    assert torch.allclose(slope, slope[:1].expand_as(slope), rtol=1e-10)
    # Karras spacing on it is the paper's Eq. 5 with sigma_min 0.002, sigma_max 80, rho 7.
    _, alpha_bar = schedule.sampling_points(18, "karras")
    sigma = ((1 - alpha_bar[:-1]) / alpha_bar[:-1]).sqrt()
    assert torch.allclose(sigma, karras_sigmas(0.002, 80.0, 18, 7.0), rtol=1e-9)
    with pytest.raises(ValueError, match="sigma_min / sigma_max apply to the edm schedule"):
        make_schedule("linear", sigma_min=0.1)


def test_preconditioning_and_loss_are_the_papers():
    sd = EDM_SIGMA_DATA
    sigma = SIGMAS.reshape(-1, 1)
    c_skip = sd**2 / (sigma**2 + sd**2)  # Table 1, "Ours"
    c_out = sigma * sd / (sigma**2 + sd**2).sqrt()
    c_in = 1 / (sigma**2 + sd**2).sqrt()
    weight = (sigma**2 + sd**2) / (sigma * sd) ** 2  # lambda(sigma)
    generator = torch.Generator().manual_seed(0)
    x0, noise, output = torch.randn(3, len(SIGMAS), 4, generator=generator, dtype=torch.float64)
    alpha_bar = 1 / (1 + SIGMAS**2)
    a = alpha_bar.sqrt().reshape(-1, 1)
    x_t = q_sample(x0, noise, alpha_bar)
    x_ve = x0 + sigma * noise
    assert torch.allclose(x_t / a, x_ve)
    assert torch.allclose(model_input(x_t, alpha_bar, "edm"), c_in * x_ve)  # F's input
    denoised = c_skip * x_ve + c_out * output  # D = c_skip x + c_out F
    assert torch.allclose(convert(output, x_t, alpha_bar, src="edm", dst="x0"), denoised)
    assert torch.allclose(target("edm", x0, noise, alpha_bar), (x0 - c_skip * x_ve) / c_out)
    # EDM's loss, lambda(sigma) |D - x0|^2, is the uniform MSE on F's target.
    got = diffusion_loss(output, x0, noise, alpha_bar, prediction="edm", weighting="uniform")
    want = (weight * (denoised - x0) ** 2).mean()
    assert float(got) == pytest.approx(float(want), rel=1e-6)  # the loss is float32


def test_log_normal_training_noise():
    schedule = make_schedule("edm")
    generators = [torch.Generator().manual_seed(i) for i in range(4000)]
    t = training_timesteps(schedule, generators, "log_normal", loc=-1.2, scale=1.2)
    log_sigma = schedule.sigma(t).log()
    assert log_sigma.mean() == pytest.approx(-1.2, abs=0.06)
    assert log_sigma.std() == pytest.approx(1.2, abs=0.05)


def _algorithm_2(x_T, steps, s_churn, s_tmin, s_tmax, s_noise, generator):
    """Karras et al. (2022) Algorithm 2 as printed, in VE form, on the exact denoiser."""

    def denoise(x_ve, sigma):
        return GAUSSIAN.posterior_mean(x_ve / math.sqrt(1 + sigma**2), 1 / (1 + sigma**2))

    t = [*karras_sigmas(0.002, 80.0, steps, 7.0).tolist(), 0.0]
    x = x_T * math.sqrt(1 + t[0] ** 2)  # our x_T is the VP state at sigma_max
    for i in range(steps):
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype)  # every step
        gamma = min(s_churn / steps, math.sqrt(2) - 1) if s_tmin <= t[i] <= s_tmax else 0.0
        t_hat = t[i] + gamma * t[i]
        x = x + math.sqrt(t_hat**2 - t[i] ** 2) * s_noise * noise
        d = (x - denoise(x, t_hat)) / t_hat
        x_next = x + (t[i + 1] - t_hat) * d
        if t[i + 1] != 0:
            d_next = (x_next - denoise(x_next, t[i + 1])) / t[i + 1]
            x_next = x + (t[i + 1] - t_hat) * (d + d_next) / 2
        x = x_next
    return x


@pytest.mark.parametrize("churn", [0.0, 40.0])
def test_heun_with_churn_is_algorithm_2(churn):
    schedule = make_schedule("edm")
    x_T = torch.randn(500, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    options = {"s_churn": churn, "s_tmin": 0.05, "s_tmax": 50.0, "s_noise": 1.003}
    sampler = make_sampler("heun", steps=18, **options)
    ours = sampler(
        GAUSSIAN.denoiser(schedule, "edm"),
        x_T,
        schedule,
        prediction="edm",
        generator=torch.Generator().manual_seed(2),
    )
    paper = _algorithm_2(x_T, 18, generator=torch.Generator().manual_seed(2), **options)
    assert torch.allclose(ours, paper, atol=1e-9), float((ours - paper).abs().max())


def test_edm_samples_follow_the_data_distribution():
    schedule = make_schedule("edm")
    x_T = torch.randn(20000, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    model = GAUSSIAN.denoiser(schedule, "edm")
    sampler = make_sampler("heun", steps=128, s_churn=40.0, s_tmin=0.05, s_tmax=50.0)
    x = sampler(model, x_T, schedule, prediction="edm", generator=torch.Generator().manual_seed(4))
    assert torch.allclose(x.mean(0), GAUSSIAN.means[0], atol=0.02)
    assert torch.allclose(x.std(0), GAUSSIAN.stds[0], rtol=0.025)
    exact = GAUSSIAN.flow_map(x_T, 1 / (1 + 80.0**2))
    errors = [
        float(
            (make_sampler("heun", steps=n)(model, x_T, schedule, prediction="edm") - exact)
            .abs()
            .max()
        )
        for n in (16, 64)
    ]
    assert errors[1] < 0.01 and errors[0] / errors[1] > 8  # second order: 16x in theory
