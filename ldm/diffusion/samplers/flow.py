"""Rectified-flow samplers: Euler and Heun on ``dx_flow / dtau = eps - x0``."""

from __future__ import annotations

import itertools

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


def sample_flow_euler(
    model: Denoiser,
    x_T: Tensor,
    schedule: Schedule,
    *,
    steps: int,
    prediction: str = "flow",
    spacing: str = "linspace",
    generator: Generators = None,
    callback: Callback | None = None,
    **spacing_opts,
) -> Tensor:
    """Euler's method on the rectified-flow ODE ``dx_flow / dtau = eps - x0`` (SD3's
    sampler; diffusers' ``FlowMatchEulerDiscreteScheduler``). The flow's paths are straight
    lines, so this is DDIM with eta 0 in other coordinates: any prediction type works."""
    _check(x_T, prediction)
    points = _points(schedule, steps, spacing, **spacing_opts)
    x = x_T
    for i, (here, there) in enumerate(itertools.pairwise(points)):
        x0, eps = _denoise(model, x, here, prediction)
        x_flow = x / here.k + (there.tau - here.tau) * (eps - x0)
        x = there.k * x_flow
        _report(callback, i, steps, here, there, x, x0)
    return x


def sample_flow_heun(
    model: Denoiser,
    x_T: Tensor,
    schedule: Schedule,
    *,
    steps: int,
    prediction: str = "flow",
    spacing: str = "linspace",
    generator: Generators = None,
    callback: Callback | None = None,
    **spacing_opts,
) -> Tensor:
    """Heun's method on the rectified-flow ODE in ``tau`` (diffusers'
    ``FlowMatchHeunDiscreteScheduler``): the velocity averaged at both ends of a step; the
    step into the clean data is an Euler step (``2 * steps - 1`` network calls). Unlike
    ``heun``, which averages the VE derivative ``eps`` over ``sigma``, it averages
    ``eps - x0`` over ``tau``: a different second-order method."""
    _check(x_T, prediction)
    points = _points(schedule, steps, spacing, **spacing_opts)
    x = x_T
    for i, (here, there) in enumerate(itertools.pairwise(points)):
        x0, eps = _denoise(model, x, here, prediction)
        step = there.tau - here.tau
        x_flow = x / here.k + step * (eps - x0)
        if there.alpha_bar != 1:
            x0_next, eps_next = _denoise(model, there.k * x_flow, there, prediction)
            x_flow = x / here.k + step * ((eps - x0) + (eps_next - x0_next)) / 2
        x = there.k * x_flow
        _report(callback, i, steps, here, there, x, x0)
    return x
