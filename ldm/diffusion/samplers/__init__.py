"""Samplers: pure functions with one signature, found by name in ``SAMPLERS``.

``sample_X(model, x_T, schedule, *, steps, prediction, spacing, generator=None,
callback=None, **opts) -> x_0``. ``model(x_t, t)`` is any denoiser that returns a
``prediction`` (``eps``, ``x0`` or ``v``) for the variance-preserving state ``x_t`` at
real-valued timesteps ``t`` of shape (B,). ``x_T`` is standard normal noise; it is used
as the state at the first sampling timestep. All state (the previous denoised estimate of
DPM-Solver++, say) is local.

Every sampler is written in variance-preserving terms (``a = sqrt(alpha_bar)``,
``s = sqrt(1 - alpha_bar)``), so a zero-terminal-SNR schedule, whose first step has
``a = 0`` and Karras ``sigma = inf``, needs no special value: the formulas reach their
limits there (Euler's first step from ``sigma = inf`` is ``x = a' D + s' x_T``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from functools import partial
from typing import Any

from torch import Tensor

from ldm.diffusion.samplers.base import (
    DDPM_VARIANCES,
    Callback,
    Denoiser,
    Generators,
    SamplerStep,
    threshold_x0,
)
from ldm.diffusion.samplers.ddpm import sample_ddim, sample_ddpm
from ldm.diffusion.samplers.dpm import (
    sample_dpmpp_2m,
    sample_dpmpp_2m_sde,
    sample_dpmpp_2s_ancestral,
    sample_dpmpp_3m_sde,
)
from ldm.diffusion.samplers.flow import sample_flow_euler, sample_flow_heun
from ldm.diffusion.samplers.karras import (
    sample_deis,
    sample_euler,
    sample_euler_ancestral,
    sample_heun,
    sample_lms,
)
from ldm.diffusion.samplers.unipc import sample_unipc
from ldm.diffusion.schedules import Schedule

__all__ = [
    "DDPM_VARIANCES",
    "SAMPLERS",
    "Callback",
    "Denoiser",
    "Generators",
    "SamplerStep",
    "get_sampler",
    "make_sampler",
    "sample_ddim",
    "sample_ddpm",
    "sample_deis",
    "sample_dpmpp_2m",
    "sample_dpmpp_2m_sde",
    "sample_dpmpp_2s_ancestral",
    "sample_dpmpp_3m_sde",
    "sample_euler",
    "sample_euler_ancestral",
    "sample_flow_euler",
    "sample_flow_heun",
    "sample_heun",
    "sampler_options",
    "threshold_x0",
]


SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "euler": sample_euler,
    "heun": sample_heun,
    "euler_ancestral": sample_euler_ancestral,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "dpmpp_3m_sde": sample_dpmpp_3m_sde,
    "dpmpp_2s_ancestral": sample_dpmpp_2s_ancestral,
    "lms": sample_lms,
    "deis": sample_deis,
    "unipc": sample_unipc,
    "flow_euler": sample_flow_euler,
    "flow_heun": sample_flow_heun,
}


def get_sampler(name: str) -> Callable[..., Tensor]:
    """The sampler function registered under ``name``."""
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; choose one of {sorted(SAMPLERS)}") from None


# What the pipeline or the caller supplies: not a sampler's own settings.
_NOT_OPTIONS = ("model", "x_T", "schedule", "steps", "prediction", "generator", "callback")


def sampler_options(name: str) -> dict[str, Any]:
    """Every setting sampler ``name`` takes (spacing's ``offset`` and ``rho`` included), at
    its default: what a grid may sweep."""
    params = inspect.signature(get_sampler(name)).parameters
    options = {k: p.default for k, p in params.items() if k not in _NOT_OPTIONS}
    options.pop("spacing_opts", None)
    spacing = inspect.signature(Schedule.sampling_points).parameters
    return options | {k: spacing[k].default for k in ("offset", "rho")}


def make_sampler(name: str, **opts) -> Callable[..., Tensor]:
    """A sampler with its options bound (``make_sampler("ddim", steps=50, eta=0.0)``).

    Options are checked against the sampler's signature now, so a typo in a config fails
    at start-up, not at the first sample.
    """
    allowed = {*sampler_options(name), *_NOT_OPTIONS[3:]}
    unknown = sorted(set(opts) - allowed)
    if unknown:
        raise ValueError(
            f"sampler {name!r} takes no option(s) {unknown}; it takes {sorted(allowed)}"
        )
    return partial(get_sampler(name), **opts)
