"""DPM-Solver++ (Lu et al. 2022): multistep solvers in data prediction over log-SNR."""

from __future__ import annotations

import itertools
import math

from torch import Tensor

from ldm.diffusion.samplers.base import (
    Callback,
    Denoiser,
    Generators,
    _check,
    _denoise,
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
