"""DDPM (Ho et al. 2020) and DDIM (Song et al. 2021), on any timestep spacing."""

from __future__ import annotations

import itertools
import math

from torch import Tensor

from ldm.diffusion.samplers.base import (
    DDPM_VARIANCES,
    Callback,
    Denoiser,
    Generators,
    _check,
    _denoise,
    _noise,
    _points,
    _report,
    threshold_x0,
)
from ldm.diffusion.schedules import Schedule


def sample_ddpm(
    model: Denoiser,
    x_T: Tensor,
    schedule: Schedule,
    *,
    steps: int,
    prediction: str = "eps",
    spacing: str = "trailing",
    variance: str = "fixed_small",
    clip_x0: float | None = None,
    dynamic_threshold: float | None = None,
    generator: Generators = None,
    callback: Callback | None = None,
    **spacing_opts,
) -> Tensor:
    """Ancestral sampling of DDPM (Ho et al. 2020, Alg. 2), on any sub-sequence of timesteps.

    ``variance``: ``fixed_small`` (the posterior variance, beta-tilde) or ``fixed_large``
    (beta). Between sampling points ``t -> t'``, ``beta = 1 - alpha_bar / alpha_bar'``
    (Nichol & Dhariwal 2021, respacing). The last step adds no noise.
    """
    _check(x_T, prediction)
    if variance not in DDPM_VARIANCES:
        raise ValueError(f"unknown DDPM variance {variance!r}; choose one of {DDPM_VARIANCES}")
    points = _points(schedule, steps, spacing, **spacing_opts)
    x = x_T
    for i, (here, there) in enumerate(itertools.pairwise(points)):
        x0, _ = _denoise(model, x, here, prediction)
        x0 = threshold_x0(x0, clip_x0, dynamic_threshold)
        ab, ab_next = here.alpha_bar, there.alpha_bar
        beta = 1 - ab / ab_next
        # Posterior q(x_t' | x_t, x0) mean (Ho et al. Eq. 7), generalised to t' < t - 1.
        coef_x0 = math.sqrt(ab_next) * beta / (1 - ab)
        coef_xt = math.sqrt(1 - beta) * (1 - ab_next) / (1 - ab)
        x = coef_x0 * x0 + coef_xt * x
        if i < steps - 1:
            var = beta * (1 - ab_next) / (1 - ab) if variance == "fixed_small" else beta
            x = x + math.sqrt(var) * _noise(x, generator)
        _report(callback, i, steps, here, there, x, x0)
    return x


def sample_ddim(
    model: Denoiser,
    x_T: Tensor,
    schedule: Schedule,
    *,
    steps: int,
    prediction: str = "eps",
    spacing: str = "trailing",
    eta: float = 0.0,
    clip_x0: float | None = None,
    dynamic_threshold: float | None = None,
    generator: Generators = None,
    callback: Callback | None = None,
    **spacing_opts,
) -> Tensor:
    """DDIM (Song et al. 2021, Eq. 12): ``eta = 0`` is deterministic, ``eta = 1`` is DDPM."""
    _check(x_T, prediction)
    if not 0 <= eta <= 1:
        raise ValueError(f"DDIM eta must be in [0, 1], got {eta}")
    points = _points(schedule, steps, spacing, **spacing_opts)
    x = x_T
    for i, (here, there) in enumerate(itertools.pairwise(points)):
        x0, eps = _denoise(model, x, here, prediction)
        x0 = threshold_x0(x0, clip_x0, dynamic_threshold)
        ab, ab_next = here.alpha_bar, there.alpha_bar
        sigma = eta * math.sqrt((1 - ab_next) / (1 - ab) * (1 - ab / ab_next))
        direction = math.sqrt(max(1 - ab_next - sigma**2, 0.0))
        x = math.sqrt(ab_next) * x0 + direction * eps
        if sigma > 0:
            x = x + sigma * _noise(x, generator)
        _report(callback, i, steps, here, there, x, x0)
    return x
