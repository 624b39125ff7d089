"""Every sampler, driven by the exact denoiser of Gaussian and Gaussian-mixture data."""

import math

import pytest
import torch

from ldm.diffusion.analytic import GaussianMixture
from ldm.diffusion.samplers import (
    SAMPLERS,
    get_sampler,
    make_sampler,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    sample_euler,
    sample_euler_ancestral,
    sample_heun,
    threshold_x0,
)
from ldm.diffusion.schedules import make_schedule

GAUSSIAN = GaussianMixture.gaussian(torch.tensor([1.5, -0.5]), torch.tensor([0.5, 2.0]))
MIXTURE = GaussianMixture(
    weights=torch.tensor([0.3, 0.7], dtype=torch.float64),
    means=torch.tensor([[-1.5, 1.0], [1.0, -0.5]], dtype=torch.float64),
    stds=torch.tensor([[0.3, 0.5], [0.5, 0.25]], dtype=torch.float64),
)
# (schedule, zero terminal SNR, prediction): every prediction type, both kinds of end.
SETTINGS = [("linear", False, "eps"), ("scaled_linear", True, "v"), ("cosine", False, "x0")]
SETTING_IDS = ["linear-eps", "scaled_linear-zsnr-v", "cosine-x0"]

# name -> (options, steps, tolerance on the relative error of the std). Tolerances are
# 1.5-3x the error measured; first-order and ancestral samplers need more steps. DDIM with
# eta = 1 is DDPM to 1e-10 on the same timesteps (test_equivalent_samplers_agree).
GAUSSIAN_CASES = {
    "ddpm": ({}, 1000, 0.02),
    "ddpm-fixed_large": ({"variance": "fixed_large"}, 1000, 0.03),
    "ddim": ({}, 250, 0.025),
    "euler": ({}, 250, 0.05),
    "euler-churn": ({"s_churn": 40.0, "s_tmin": 0.05, "s_tmax": 50.0}, 1000, 0.04),
    "heun": ({}, 100, 0.02),
    "euler_ancestral": ({}, 1000, 0.03),
    "dpmpp_2m": ({}, 100, 0.02),
}


def _run(name, data, setting, steps, n, seed=0, **opts):
    schedule_name, zero_snr, prediction = setting
    schedule = make_schedule(schedule_name, zero_terminal_snr=zero_snr)
    generator = torch.Generator().manual_seed(seed)
    x_T = torch.randn(n, data.dim, generator=generator, dtype=torch.float64)
    # Exactly standardised, so the sample's own mean / std error does not hide the sampler's.
    x_T = (x_T - x_T.mean(0)) / x_T.std(0)
    sampler = get_sampler(name.split("-")[0])
    model = data.denoiser(schedule, prediction)
    out = sampler(
        model, x_T, schedule, steps=steps, prediction=prediction, generator=generator, **opts
    )
    return out, x_T, schedule


@pytest.mark.parametrize("setting", SETTINGS, ids=SETTING_IDS)
@pytest.mark.parametrize("case", GAUSSIAN_CASES)
def test_gaussian_data_is_recovered(case, setting):
    opts, steps, tol = GAUSSIAN_CASES[case]
    x, _, _ = _run(case, GAUSSIAN, setting, steps, n=20_000, **opts)
    std = GAUSSIAN.stds[0]
    assert ((x.mean(0) - GAUSSIAN.means[0]) / std).abs().max() < 0.025
    assert (x.std(0) / std - 1).abs().max() < tol


MIXTURE_CASES = {
    "ddpm": ({}, 250, 0.02),
    "ddim": ({}, 250, 0.025),
    "euler": ({}, 250, 0.035),
    "heun": ({}, 100, 0.01),
    "euler_ancestral": ({}, 500, 0.025),
    "dpmpp_2m": ({}, 100, 0.01),
}


@pytest.mark.parametrize("setting", SETTINGS[:2], ids=SETTING_IDS[:2])
@pytest.mark.parametrize("case", MIXTURE_CASES)
def test_two_component_mixture_is_recovered(case, setting):
    opts, steps, tol = MIXTURE_CASES[case]
    x, _, _ = _run(case, MIXTURE, setting, steps, n=40_000, **opts)
    std = MIXTURE.covariance().diagonal().sqrt()
    assert ((x.mean(0) - MIXTURE.mean()) / std).abs().max() < 0.02
    assert (x.std(0) / std - 1).abs().max() < tol
    # The mass of each component, by posterior responsibility of the samples.
    weights = MIXTURE.responsibilities(x).mean(0)
    assert (weights - MIXTURE.weights).abs().max() < 0.01


# name -> (order of accuracy, (coarse, fine) steps, error bound at fine steps, relative to std).
# The linear schedule keeps the last Euler step (from sigma_min to 0) from masking the order.
ODE_CASES = {
    "ddim": (1, (250, 1000), 0.03),
    "euler": (1, (250, 1000), 0.03),
    "heun": (2, (100, 400), 0.0025),
    "dpmpp_2m": (2, (100, 400), 0.0025),
}
ODE_SETTINGS = [("linear", False, "eps"), ("linear", True, "v")]


@pytest.mark.parametrize("setting", ODE_SETTINGS, ids=["linear-eps", "linear-zsnr-v"])
@pytest.mark.parametrize("name", ODE_CASES)
def test_deterministic_samplers_solve_the_probability_flow_ode(name, setting):
    """Against the closed-form ODE solution; the error shrinks at the method's order."""
    order, (coarse, fine), bound = ODE_CASES[name]
    errors = []
    for steps in (coarse, fine):
        x, x_T, schedule = _run(name, GAUSSIAN, setting, steps, n=2000)
        exact = GAUSSIAN.flow_map(x_T, float(schedule.alphas_cumprod[-1]))
        errors.append(((x - exact) / GAUSSIAN.stds[0]).abs().max().item())
    assert errors[1] < bound
    observed = math.log(errors[0] / errors[1]) / math.log(fine / coarse)
    assert order - 0.25 < observed < order + 0.5, f"observed order {observed:.2f}"


def test_equivalent_samplers_agree():
    """DDIM(eta=1) is DDPM; Euler is DDIM(eta=0) and ancestral Euler DDIM(eta=1) on the same
    timesteps (Karras et al. 2022, Sec. 4 and App. B)."""
    setting = ("cosine", False, "v")
    for spacing in ("trailing", "karras"):
        ddpm, _, _ = _run("ddpm", MIXTURE, setting, 40, 500, spacing=spacing)
        ddim1, _, _ = _run("ddim", MIXTURE, setting, 40, 500, spacing=spacing, eta=1.0)
        ancestral, _, _ = _run("euler_ancestral", MIXTURE, setting, 40, 500, spacing=spacing)
        torch.testing.assert_close(ddim1, ddpm, rtol=0, atol=1e-10)
        torch.testing.assert_close(ancestral, ddpm, rtol=0, atol=1e-10)
        euler, _, _ = _run("euler", MIXTURE, setting, 40, 500, spacing=spacing)
        ddim0, _, _ = _run("ddim", MIXTURE, setting, 40, 500, spacing=spacing)
        torch.testing.assert_close(euler, ddim0, rtol=0, atol=1e-10)


def test_determinism():
    schedule = make_schedule("linear")
    model = MIXTURE.denoiser(schedule, "eps")
    x_T = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def run(sampler, seed, **opts):
        opts.setdefault("generator", torch.Generator().manual_seed(seed))
        return sampler(model, x_T, schedule, steps=20, prediction="eps", **opts)

    # DDIM with eta = 0 depends on its noise input alone ...
    assert torch.equal(run(sample_ddim, 0), run(sample_ddim, 1))
    assert torch.equal(run(sample_ddim, 0), run(sample_ddim, 0, generator=None))
    # ... DDPM draws fresh noise, reproducibly for a given generator.
    assert not torch.allclose(run(sample_ddpm, 0), run(sample_ddpm, 1))
    for sampler in SAMPLERS.values():
        assert torch.equal(run(sampler, 7), run(sampler, 7))


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_callback_sees_every_step(name):
    schedule = make_schedule("scaled_linear", zero_terminal_snr=True)
    seen = []
    x_T = torch.randn(4, 2, dtype=torch.float32)
    out = get_sampler(name)(
        MIXTURE.denoiser(schedule, "v"), x_T, schedule, steps=7, prediction="v",
        spacing="trailing", callback=seen.append,
    )  # fmt: skip
    t, _ = schedule.sampling_points(7, "trailing")
    assert [s.index for s in seen] == list(range(7)) and {s.steps for s in seen} == {7}
    assert [s.t for s in seen] == t.tolist()
    assert [s.t_next for s in seen] == [*t.tolist()[1:], -1.0]
    assert torch.equal(seen[-1].x, out) and out.dtype == torch.float32
    assert all(s.denoised.shape == x_T.shape for s in seen)


def test_heun_network_evaluations():
    calls = []

    def model(x, t):
        calls.append(t[0].item())
        return torch.zeros_like(x)

    for zero_snr, expected in ((False, 2 * 10 - 1), (True, 2 * 10 - 2)):
        calls.clear()
        schedule = make_schedule("linear", zero_terminal_snr=zero_snr)
        sample_heun(model, torch.randn(2, 2), schedule, steps=10, prediction="v")
        assert len(calls) == expected


def test_thresholding():
    x0 = torch.tensor([[0.5, -3.0, 2.0, 0.1], [0.2, -0.3, 0.9, 0.0]])
    assert torch.equal(threshold_x0(x0, clip_x0=1.0), x0.clamp(-1, 1))
    out = threshold_x0(x0, dynamic_threshold=0.75)
    r = torch.quantile(x0[0].abs(), 0.75)
    torch.testing.assert_close(out[0], x0[0].clamp(-r, r) / r)
    assert torch.equal(out[1], x0[1]), "a sample inside [-1, 1] is left alone"
    capped = threshold_x0(x0, clip_x0=1.5, dynamic_threshold=0.75)
    torch.testing.assert_close(capped[0], x0[0].clamp(-1.5, 1.5) / 1.5)
    schedule = make_schedule("linear")
    wide = GaussianMixture.gaussian(torch.zeros(2), torch.full((2,), 3.0))
    x = sample_ddim(
        wide.denoiser(schedule, "eps"), torch.randn(256, 2), schedule, steps=20, clip_x0=1.0
    )
    assert x.abs().max() <= 1.0 + 1e-6


def test_zero_snr_with_eps_prediction_fails_clearly():
    schedule = make_schedule("linear", zero_terminal_snr=True)
    model = GAUSSIAN.denoiser(schedule, "eps")
    with pytest.raises(ValueError, match="prediction='v' or 'x0'"):
        sample_dpmpp_2m(model, torch.randn(4, 2), schedule, steps=10, prediction="eps")


def test_registry_and_bad_options():
    assert {"ddpm", "ddim", "euler", "heun", "euler_ancestral", "dpmpp_2m"} <= set(SAMPLERS)
    assert {"flow_euler", "flow_heun"} <= set(SAMPLERS)
    sampler = make_sampler("ddim", steps=10, eta=0.5, spacing="leading", offset=1)
    assert sampler.func is sample_ddim and sampler.keywords["eta"] == 0.5
    with pytest.raises(ValueError, match=r"unknown sampler 'plms'; choose one of"):
        get_sampler("plms")
    with pytest.raises(ValueError, match=r"sampler 'euler' takes no option\(s\) \['eta'\]"):
        make_sampler("euler", eta=0.5)
    schedule = make_schedule("linear")
    with pytest.raises(ValueError, match="DDIM eta must be in"):
        sample_ddim(lambda x, t: x, torch.randn(2, 2), schedule, steps=5, eta=2.0)
    with pytest.raises(ValueError, match="unknown DDPM variance 'learned'"):
        sample_ddpm(lambda x, t: x, torch.randn(2, 2), schedule, steps=5, variance="learned")
    with pytest.raises(ValueError, match=r"denoiser returned shape \(2, 3\)"):
        sample_euler(lambda x, t: torch.zeros(2, 3), torch.randn(2, 2), schedule, steps=5)
    with pytest.raises(ValueError, match="eta must be non-negative"):
        sample_euler_ancestral(lambda x, t: x, torch.randn(2, 2), schedule, steps=5, eta=-1)


# Network calls for `steps` steps (plain schedule; zero terminal SNR saves one in the
# two-stage samplers, whose step out of sigma = inf is an Euler step): what NFE counts.
NFE = {
    "ddpm": lambda n: n,
    "ddim": lambda n: n,
    "euler": lambda n: n,
    "heun": lambda n: 2 * n - 1,
    "euler_ancestral": lambda n: n,
    "dpmpp_2m": lambda n: n,
    "lms": lambda n: n,
    "dpmpp_2m_sde": lambda n: n,
    "dpmpp_3m_sde": lambda n: n,
    "dpmpp_2s_ancestral": lambda n: 2 * n - 1,
    "flow_euler": lambda n: n,
    "flow_heun": lambda n: 2 * n - 1,
    "unipc": lambda n: n,  # the corrector reuses the next step's call
    "deis": lambda n: n,
}


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_every_sampler_makes_its_documented_number_of_network_calls(name):
    schedule = make_schedule("scaled_linear")
    calls = []
    exact = GAUSSIAN.denoiser(schedule, "v")

    def model(x, t):
        calls.append(t)
        return exact(x, t)

    x_T = torch.randn(8, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    make_sampler(name, steps=7)(model, x_T, schedule, prediction="v", generator=torch.Generator())
    assert len(calls) == NFE[name](7)
