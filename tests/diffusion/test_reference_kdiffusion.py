"""Our samplers against k-diffusion's (0.1.1.post1, a test-only oracle) on the exact denoiser
of a Gaussian mixture, on the same Karras noise levels, from the same starting noise, and
for stochastic samplers with the same noise increments fed to both."""

import importlib
import importlib.util
import sys
import types

import pytest
import torch

from ldm.diffusion.analytic import GaussianMixture
from ldm.diffusion.samplers import make_sampler
from ldm.diffusion.schedules import make_schedule


def _k_sampling() -> types.ModuleType:
    """``k_diffusion.sampling`` without the package's ``__init__``, which imports its
    training and evaluation code (and their dependencies: kornia, clip, ...)."""
    if "k_diffusion.sampling" in sys.modules:
        return sys.modules["k_diffusion.sampling"]
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None:
        raise ImportError(
            "k-diffusion is a test dependency: pip install --no-deps k-diffusion==0.1.1.post1 "
            "(make installs it)"
        )
    package = types.ModuleType("k_diffusion")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules.setdefault("k_diffusion", package)
    return importlib.import_module("k_diffusion.sampling")


MIXTURE = GaussianMixture(
    torch.tensor([0.3, 0.7], dtype=torch.float64),
    torch.tensor([[1.0, -0.5, 0.2], [-1.0, 0.5, 0.8]], dtype=torch.float64),
    torch.tensor([[0.3, 0.5, 0.2], [0.6, 0.2, 0.4]], dtype=torch.float64),
)
CASES = [  # (ours, k-diffusion's, options for both, our sampler's only)
    ("euler", "sample_euler", {}, {}),
    ("heun", "sample_heun", {}, {}),
    # A window below every schedule's sigma_max: above it the network's timestep is clamped
    # to the table's end (here and in k-diffusion's wrappers) while its exact model is not.
    ("heun", "sample_heun", {"s_churn": 20.0, "s_tmin": 0.1, "s_tmax": 10.0, "s_noise": 1.003}, {}),
    (
        "euler",
        "sample_euler",
        {"s_churn": 20.0, "s_tmin": 0.1, "s_tmax": 10.0, "s_noise": 1.003},
        {},
    ),
    ("euler_ancestral", "sample_euler_ancestral", {"eta": 1.0}, {}),
    ("dpmpp_2m", "sample_dpmpp_2m", {}, {}),
    ("lms", "sample_lms", {}, {}),
    ("lms", "sample_lms", {"order": 2}, {}),
    ("dpmpp_2s_ancestral", "sample_dpmpp_2s_ancestral", {"eta": 1.0}, {}),
    ("dpmpp_2m_sde", "sample_dpmpp_2m_sde", {"eta": 1.0, "solver_type": "midpoint"}, {}),
    ("dpmpp_2m_sde", "sample_dpmpp_2m_sde", {"eta": 1.0, "solver_type": "heun"}, {}),
    ("dpmpp_2m_sde", "sample_dpmpp_2m_sde", {"eta": 0.0}, {}),
    ("dpmpp_3m_sde", "sample_dpmpp_3m_sde", {"eta": 1.0}, {}),
    ("dpmpp_3m_sde", "sample_dpmpp_3m_sde", {"eta": 0.0}, {}),
]
SCHEDULES = [("scaled_linear", "eps", 12), ("linear", "v", 20), ("edm", "edm", 15)]


def _k_denoiser(x_ve, sigma, **_):
    """What a k-diffusion model returns: the denoised estimate at noise level sigma."""
    sigma = float(sigma.reshape(-1)[0])
    return MIXTURE.posterior_mean(x_ve / (1 + sigma**2) ** 0.5, 1 / (1 + sigma**2))


@pytest.mark.parametrize(("schedule_name", "prediction", "steps"), SCHEDULES)
def test_the_noise_levels_are_k_diffusions(schedule_name, prediction, steps):
    """The Karras levels both run on (the test below passes ours to k-diffusion)."""
    k = _k_sampling()
    schedule = make_schedule(schedule_name)
    _, alpha_bar = schedule.sampling_points(steps, "karras")
    sigmas = ((1 - alpha_bar) / alpha_bar).sqrt()
    sigma_min, sigma_max = float(schedule.sigmas[0]), float(schedule.sigmas[-1])
    theirs = k.get_sigmas_karras(steps, sigma_min, sigma_max, rho=7.0).double()
    torch.testing.assert_close(sigmas, theirs, rtol=3e-6, atol=0)  # theirs are float32


@pytest.mark.parametrize("schedule_case", SCHEDULES, ids=lambda c: c[0])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{'-'.join(map(str, c[2].values()))}")
def test_samplers_match_k_diffusion(case, schedule_case):
    name, k_name, options, _ = case
    schedule_name, prediction, steps = schedule_case
    k = _k_sampling()
    schedule = make_schedule(schedule_name)
    x_T = torch.randn(64, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ours = make_sampler(name, steps=steps, **options)(
        MIXTURE.denoiser(schedule, prediction),
        x_T,
        schedule,
        prediction=prediction,
        generator=torch.Generator().manual_seed(1),
    )
    _, alpha_bar = schedule.sampling_points(steps, "karras")
    sigmas = ((1 - alpha_bar) / alpha_bar).sqrt()  # ends at 0, as k-diffusion's do
    x = x_T / alpha_bar[0].sqrt()  # our x_T is the VP state: the VE state is x_T / a
    stream = torch.Generator().manual_seed(1)
    extra = dict(options)
    if "eta" in options:  # the same increments, drawn in the same order
        extra["noise_sampler"] = lambda *_: torch.randn(x.shape, generator=stream, dtype=x.dtype)
    torch.manual_seed(1)  # k-diffusion's churn draws from the global generator
    theirs = getattr(k, k_name)(_k_denoiser, x, sigmas, disable=True, **extra)
    assert (ours - theirs).abs().max() < 1e-10, float((ours - theirs).abs().max())
