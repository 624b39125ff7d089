"""Karras et al. (2022)'s ODE samplers in sigma (Euler, Heun with churn) and k-diffusion's
ancestral Euler."""

from __future__ import annotations

import itertools
import math

import numpy as np
from torch import Tensor

from ldm.diffusion.samplers.base import (
    Callback,
    Denoiser,
    Generators,
    _ancestral,
    _check,
    _churn,
    _denoise,
    _noise,
    _points,
    _report,
)
from ldm.diffusion.schedules import Schedule


def sample_euler(
    model: Denoiser,
    x_T: Tensor,
    schedule: Schedule,
    *,
    steps: int,
    prediction: str = "eps",
    spacing: str = "karras",
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = math.inf,
    s_noise: float = 1.0,
    generator: Generators = None,
    callback: Callback | None = None,
    **spacing_opts,
) -> Tensor:
    """Euler's method on the probability-flow ODE (Karras et al. 2022, Alg. 2 with churn)."""
    _check(x_T, prediction)
    points = _points(schedule, steps, spacing, **spacing_opts)
    x = x_T
    for i, (here, there) in enumerate(itertools.pairwise(points)):
        x, here = _churn(x, here, schedule, generator, s_churn, s_tmin, s_tmax, s_noise, steps)
        x0, eps = _denoise(model, x, here, prediction)
        # x_ve' = x_ve + (sigma' - sigma) (x_ve - D) / sigma = D + sigma' eps; times a'.
        x = there.a * x0 + there.s * eps
        _report(callback, i, steps, here, there, x, x0)
    return x


def sample_heun(
    model: Denoiser,
    x_T: Tensor,
    schedule: Schedule,
    *,
    steps: int,
    prediction: str = "eps",
    spacing: str = "karras",
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = math.inf,
    s_noise: float = 1.0,
    generator: Generators = None,
    callback: Callback | None = None,
    **spacing_opts,
) -> Tensor:
    """Heun's second-order method (Karras et al. 2022, Alg. 2).

    The step into the clean data, and the step out of ``sigma = inf`` at zero terminal
    SNR, are Euler steps (the trapezoid has no finite limit there): ``2 * steps - 1``
    network calls, ``2 * steps - 2`` at zero terminal SNR.
    """
    _check(x_T, prediction)
    points = _points(schedule, steps, spacing, **spacing_opts)
    x = x_T
    for i, (here, there) in enumerate(itertools.pairwise(points)):
        x, here = _churn(x, here, schedule, generator, s_churn, s_tmin, s_tmax, s_noise, steps)
        x0, eps = _denoise(model, x, here, prediction)
        x_euler = there.a * x0 + there.s * eps
        if there.alpha_bar == 1 or here.alpha_bar == 0:
            x = x_euler
        else:
            _, eps_next = _denoise(model, x_euler, there, prediction)
            # The VE derivative (x_ve - D) / sigma is eps; average it at both ends.
            x_ve = x / here.a + (there.sigma - here.sigma) * (eps + eps_next) / 2
            x = there.a * x_ve
        _report(callback, i, steps, here, there, x, x0)
    return x


def sample_euler_ancestral(
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
    """Ancestral Euler (k-diffusion's ``sample_euler_ancestral``): an Euler step to
    ``sigma_down``, then fresh noise of size ``sigma_up``."""
    _check(x_T, prediction)
    if eta < 0:
        raise ValueError(f"eta must be non-negative, got {eta}")
    points = _points(schedule, steps, spacing, **spacing_opts)
    x = x_T
    for i, (here, there) in enumerate(itertools.pairwise(points)):
        x0, eps = _denoise(model, x, here, prediction)
        sigma_down, sigma_up = _ancestral(here.sigma, there.sigma, eta)
        x_ve = x0 + sigma_down * eps
        if sigma_up > 0:
            x_ve = x_ve + sigma_up * s_noise * _noise(x, generator)
        x = there.a * x_ve
        _report(callback, i, steps, here, there, x, x0)
    return x


def _lms_coefficients(nodes: list[float], target: float) -> list[float]:
    """The integrals from ``nodes[0]`` to ``target`` of the Lagrange basis polynomials on
    ``nodes`` (newest first), in closed form."""
    out = []
    for j, node in enumerate(nodes):
        basis = np.poly1d([1.0])
        for k, other in enumerate(nodes):
            if k != j:
                basis = basis * np.poly1d([1.0, -other]) / (node - other)
        antiderivative = np.polyint(basis)
        out.append(float(antiderivative(target) - antiderivative(nodes[0])))
    return out


def sample_lms(
    model: Denoiser,
    x_T: Tensor,
    schedule: Schedule,
    *,
    steps: int,
    prediction: str = "eps",
    spacing: str = "karras",
    order: int = 4,
    generator: Generators = None,
    callback: Callback | None = None,
    **spacing_opts,
) -> Tensor:
    """Linear multistep (k-diffusion's ``sample_lms``): the VE derivative ``eps`` of the
    last ``order`` steps, interpolated by a polynomial in ``sigma`` and integrated over the
    step exactly. From ``sigma = inf`` (zero terminal SNR) the first step is Euler's."""
    _check(x_T, prediction)
    if order < 1:
        raise ValueError(f"LMS order must be at least 1, got {order}")
    points = _points(schedule, steps, spacing, **spacing_opts)
    x = x_T
    history: list[tuple[float, Tensor]] = []  # (sigma, eps), newest last
    for i, (here, there) in enumerate(itertools.pairwise(points)):
        x0, eps = _denoise(model, x, here, prediction)
        if math.isinf(here.sigma):
            x = there.a * x0 + there.s * eps
        else:
            history = [*history, (here.sigma, eps)][-order:]
            nodes = [sigma for sigma, _ in reversed(history)]
            coefficients = _lms_coefficients(nodes, there.sigma)
            x_ve = x / here.a
            for coefficient, (_, d) in zip(coefficients, reversed(history), strict=True):
                x_ve = x_ve + coefficient * d
            x = there.a * x_ve
        _report(callback, i, steps, here, there, x, x0)
    return x


def _deis_antiderivative(t: float, nodes: list[float]) -> float:
    """The antiderivative at ``t`` (in sigma) of the Lagrange basis polynomial, in ``log
    sigma``, of ``nodes[0]`` over ``nodes`` (2 or 3 of them): diffusers' ``ind_fn``. Its
    limit at ``t = 0`` is 0 (``t log^k t -> 0``)."""
    if t == 0:
        return 0.0
    lt = math.log(t)
    logs = [math.log(n) for n in nodes]
    if len(nodes) == 2:
        b, c = logs
        return t * (-c + lt - 1) / (b - c)
    b, c, d = logs
    numerator = t * (c * (d - lt + 1) - d * lt + d + lt**2 - 2 * lt + 2)
    return numerator / ((b - c) * (b - d))


def sample_deis(
    model: Denoiser,
    x_T: Tensor,
    schedule: Schedule,
    *,
    steps: int,
    prediction: str = "eps",
    spacing: str = "karras",
    order: int = 2,
    lower_order_final: bool = True,
    generator: Generators = None,
    callback: Callback | None = None,
    **spacing_opts,
) -> Tensor:
    """DEIS (Zhang & Chen 2023), log-rho multistep as in diffusers'
    ``DEISMultistepScheduler``: the noise estimates of the last ``order`` (1-3) steps,
    interpolated by a polynomial in ``log sigma`` and integrated over ``sigma`` in closed
    form. The order warms up from 1 and, with ``lower_order_final`` and fewer than 15 steps,
    comes down over the last two (diffusers' rule). The step out of ``sigma = inf`` is the
    exact DDIM step."""
    _check(x_T, prediction)
    if order not in (1, 2, 3):
        raise ValueError(f"DEIS order must be 1, 2 or 3, got {order}")
    points = _points(schedule, steps, spacing, **spacing_opts)
    x = x_T
    history: list[tuple[float, Tensor]] = []  # (sigma, eps), newest last
    for i, (here, there) in enumerate(itertools.pairwise(points)):
        x0, eps = _denoise(model, x, here, prediction)
        if math.isinf(here.sigma):
            x = there.a * x0 + there.s * eps
            _report(callback, i, steps, here, there, x, x0)
            continue
        history = [*history, (here.sigma, eps)][-order:]
        this_order = len(history)
        if lower_order_final and steps < 15:
            this_order = min(this_order, steps - i)
        x_ve = x / here.a
        if this_order == 1:
            x_ve = x_ve + (there.sigma - here.sigma) * eps
        else:
            used = list(reversed(history[-this_order:]))  # newest first
            nodes = [sigma for sigma, _ in used]
            for k, (_, estimate) in enumerate(used):
                rotated = nodes[k:] + nodes[:k]  # this node first, the others after
                weight = _deis_antiderivative(there.sigma, rotated)
                weight -= _deis_antiderivative(here.sigma, rotated)
                x_ve = x_ve + weight * estimate
        x = there.a * x_ve
        _report(callback, i, steps, here, there, x, x0)
    return x
