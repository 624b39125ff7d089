"""DPM-Solver++ (Lu et al. 2022) in data prediction over the half log-SNR ``lambda``: the
2M multistep solver, its SDE variants (k-diffusion's 2M SDE and 3M SDE) and the ancestral
singlestep 2S. Written in VP terms: with ``h = lambda' - lambda``, the VE update
``x_ve' = e^{-h} x_ve + ...`` is ``x' = (s' / s) x + a' (...)``."""

from __future__ import annotations

import itertools
import math

from torch import Tensor

from ldm.diffusion.samplers.base import (
    Callback,
    Denoiser,
    Generators,
    _ancestral,
    _at_sigma,
    _check,
    _denoise,
    _noise,
    _points,
    _report,
)
from ldm.diffusion.schedules import Schedule


def sample_dpmpp_2m(
    model: Denoiser,
    x_T: Tensor,
    schedule: Schedule,
    *,
    steps: int,
    prediction: str = "eps",
    spacing: str = "karras",
    generator: Generators = None,
    callback: Callback | None = None,
    **spacing_opts,
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2): multistep second order in data prediction.

    The first step and the step into the clean data are first order (as in k-diffusion).
    """
    _check(x_T, prediction)
    points = _points(schedule, steps, spacing, **spacing_opts)
    x = x_T
    previous: tuple[Tensor, float] | None = None  # (denoised, step size h) of the last step
    for i, (here, there) in enumerate(itertools.pairwise(points)):
        x0, _ = _denoise(model, x, here, prediction)
        h = there.lam - here.lam
        if previous is None or there.alpha_bar == 1:
            estimate = x0
        else:
            r = previous[1] / h  # inf after a zero-SNR first step: first order again
            estimate = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * previous[0]
        # x' = (s' / s) x - a' (e^{-h} - 1) D  (Lu et al. 2022, Eq. 10 with lambda = log(a / s))
        x = (there.s / here.s) * x - there.a * math.expm1(-h) * estimate
        previous = (x0, h)
        _report(callback, i, steps, here, there, x, x0)
    return x


def _check_eta(eta: float) -> None:
    if eta < 0:
        raise ValueError(f"eta must be non-negative, got {eta}")


def sample_dpmpp_2m_sde(
    model: Denoiser,
    x_T: Tensor,
    schedule: Schedule,
    *,
    steps: int,
    prediction: str = "eps",
    spacing: str = "karras",
    eta: float = 1.0,
    s_noise: float = 1.0,
    solver_type: str = "midpoint",
    generator: Generators = None,
    callback: Callback | None = None,
    **spacing_opts,
) -> Tensor:
    """DPM-Solver++(2M) SDE (k-diffusion's ``sample_dpmpp_2m_sde``; Lu et al. 2022, Sec. 5
    with the SDE's exact noise term): ``eta`` scales the injected noise (0: the ODE solver,
    which with ``midpoint`` is ``dpmpp_2m``); ``solver_type`` ``midpoint`` or ``heun`` is the
    second-order correction. The step into the clean data returns the denoised estimate."""
    _check(x_T, prediction)
    _check_eta(eta)
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    points = _points(schedule, steps, spacing, **spacing_opts)
    x = x_T
    old: Tensor | None = None  # the previous denoised estimate
    h_last = math.nan
    for i, (here, there) in enumerate(itertools.pairwise(points)):
        x0, _ = _denoise(model, x, here, prediction)
        if there.alpha_bar == 1:
            x = x0
        else:
            h = there.lam - here.lam
            eta_h = eta * h if eta else 0.0
            phi = -math.expm1(-h - eta_h)  # 1 - e^{-(1 + eta) h}
            x = math.exp(-eta_h) * (there.s / here.s) * x + there.a * phi * x0
            if old is not None:
                r = h_last / h  # inf after a zero-SNR first step: no correction
                weight = phi / (-h - eta_h) + 1 if solver_type == "heun" else 0.5 * phi
                x = x + there.a * weight / r * (x0 - old)
            if eta:
                noise = _noise(x, generator)
                x = x + there.s * math.sqrt(-math.expm1(-2 * eta_h)) * s_noise * noise
            h_last = h
        old = x0
        _report(callback, i, steps, here, there, x, x0)
    return x


def sample_dpmpp_3m_sde(
    model: Denoiser,
    x_T: Tensor,
    schedule: Schedule,
    *,
    steps: int,
    prediction: str = "eps",
    spacing: str = "karras",
    eta: float = 1.0,
    s_noise: float = 1.0,
    generator: Generators = None,
    callback: Callback | None = None,
    **spacing_opts,
) -> Tensor:
    """DPM-Solver++(3M) SDE (k-diffusion's ``sample_dpmpp_3m_sde``): third-order multistep
    from the last three denoised estimates (second order on the second step, first on the
    first), with the SDE's noise scaled by ``eta``."""
    _check(x_T, prediction)
    _check_eta(eta)
    points = _points(schedule, steps, spacing, **spacing_opts)
    x = x_T
    d_1: Tensor | None = None  # denoised estimates of the last two steps
    d_2: Tensor | None = None
    h_1 = h_2 = math.nan  # and their step sizes
    for i, (here, there) in enumerate(itertools.pairwise(points)):
        x0, _ = _denoise(model, x, here, prediction)
        h = math.nan
        if there.alpha_bar == 1:
            x = x0
        else:
            h = there.lam - here.lam
            h_eta = h * (eta + 1)
            x = math.exp(-h * eta if eta else 0.0) * (there.s / here.s) * x
            x = x - there.a * math.expm1(-h_eta) * x0
            if d_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (x0 - d_1) / r0
                d1_1 = (d_1 - d_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * (r0 / (r0 + r1))
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_2 = math.expm1(-h_eta) / h_eta + 1
                phi_3 = phi_2 / h_eta - 0.5
                x = x + there.a * (phi_2 * d1 - phi_3 * d2)
            elif d_1 is not None:
                phi_2 = math.expm1(-h_eta) / h_eta + 1
                x = x + there.a * phi_2 * (x0 - d_1) / (h_1 / h)
            if eta:
                noise = _noise(x, generator)
                x = x + there.s * math.sqrt(-math.expm1(-2 * h * eta)) * s_noise * noise
        d_1, d_2 = x0, d_1
        h_1, h_2 = h, h_1
        _report(callback, i, steps, here, there, x, x0)
    return x


def sample_dpmpp_2s_ancestral(
    model: Denoiser,
    x_T: Tensor,
    schedule: Schedule,
    *,
    steps: int,
    prediction: str = "eps",
    spacing: str = "karras",
    eta: float = 1.0,
    s_noise: float = 1.0,
    generator: Generators = None,
    callback: Callback | None = None,
    **spacing_opts,
) -> Tensor:
    """Ancestral DPM-Solver++(2S) (k-diffusion's ``sample_dpmpp_2s_ancestral``): a
    second-order singlestep to ``sigma_down`` through the midpoint ``sqrt(sigma
    sigma_down)`` (one extra network call), then fresh noise of size ``sigma_up``. Steps that
    end at ``sigma_down = 0``, and the step out of ``sigma = inf``, are Euler steps:
    ``2 * steps - 1`` calls."""
    _check(x_T, prediction)
    _check_eta(eta)
    points = _points(schedule, steps, spacing, **spacing_opts)
    x = x_T
    for i, (here, there) in enumerate(itertools.pairwise(points)):
        x0, eps = _denoise(model, x, here, prediction)
        sigma_down, sigma_up = _ancestral(here.sigma, there.sigma, eta)
        if sigma_down == 0 or math.isinf(here.sigma):
            x_ve = x0 + sigma_down * eps
        else:
            h = math.log(here.sigma / sigma_down)
            x_ve = x / here.a
            middle = _at_sigma(schedule, math.sqrt(here.sigma * sigma_down))
            x_mid = (middle.sigma / here.sigma) * x_ve - math.expm1(-h / 2) * x0
            x0_mid, _ = _denoise(model, middle.a * x_mid, middle, prediction)
            x_ve = (sigma_down / here.sigma) * x_ve - math.expm1(-h) * x0_mid
        if sigma_up > 0:
            x_ve = x_ve + sigma_up * s_noise * _noise(x, generator)
        x = there.a * x_ve
        _report(callback, i, steps, here, there, x, x0)
    return x
