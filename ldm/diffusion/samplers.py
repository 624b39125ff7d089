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
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor

from ldm.diffusion.objective import check_prediction, model_input, x0_and_eps
from ldm.diffusion.schedules import Schedule

Denoiser = Callable[[Tensor, Tensor], Tensor]
# One generator for the batch, or one per sample (batch-independent noise), or None.
Generators = torch.Generator | Sequence[torch.Generator] | None
DDPM_VARIANCES = ("fixed_small", "fixed_large")


@dataclass(frozen=True)
class SamplerStep:
    """What a ``callback`` sees after each step."""

    index: int  # 0-based step number
    steps: int  # total number of steps
    t: float  # timestep the step started from
    t_next: float  # timestep it moved to (-1: the clean data)
    x: Tensor  # state after the step, at t_next
    denoised: Tensor  # the x0 estimate the step used


Callback = Callable[[SamplerStep], None]


@dataclass(frozen=True)
class _Point:
    """One sampling point: timestep and its coefficients (python floats, from float64)."""

    t: float
    alpha_bar: float

    @property
    def a(self) -> float:
        return math.sqrt(self.alpha_bar)

    @property
    def s(self) -> float:
        return math.sqrt(1 - self.alpha_bar)

    @property
    def sigma(self) -> float:  # Karras' VE noise level
        return math.inf if self.alpha_bar == 0 else self.s / self.a

    @property
    def k(self) -> float:  # a + s: the VP state over the flow state
        return self.a + self.s

    @property
    def tau(self) -> float:  # rectified flow's time, s / (a + s)
        return self.s / self.k

    @property
    def lam(self) -> float:  # half log-SNR, log(a / s)
        if self.alpha_bar == 0:
            return -math.inf
        return math.inf if self.alpha_bar == 1 else math.log(self.a) - math.log(self.s)


def _points(schedule: Schedule, steps: int, spacing: str, **spacing_opts) -> list[_Point]:
    t, alpha_bar = schedule.sampling_points(steps, spacing, **spacing_opts)
    times = [*t.tolist(), -1.0]
    return [_Point(ti, ab) for ti, ab in zip(times, alpha_bar.tolist(), strict=True)]


def _noise(x: Tensor, generator: Generators) -> Tensor:
    """Standard normal noise like ``x``, drawn on the generator's device for reproducibility;
    with a sequence of generators, sample i's noise comes from generator i (so a sample's
    noise does not depend on the rest of its batch)."""
    if isinstance(generator, Sequence):
        if len(generator) != x.shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {x.shape[0]}")
        return torch.stack(
            [
                torch.randn(x.shape[1:], generator=g, device=g.device, dtype=x.dtype)
                for g in generator
            ]
        ).to(x.device)
    device = x.device if generator is None else generator.device
    return torch.randn(x.shape, generator=generator, device=device, dtype=x.dtype).to(x.device)


def threshold_x0(
    x0: Tensor, clip_x0: float | None = None, dynamic_threshold: float | None = None
) -> Tensor:
    """Static clipping to ``[-clip_x0, clip_x0]`` and/or Imagen's dynamic thresholding.

    Dynamic thresholding (Saharia et al. 2022): per sample, ``r`` = the
    ``dynamic_threshold`` quantile of ``|x0|``, at least 1 (and at most ``clip_x0`` when
    given); clip to ``[-r, r]`` and divide by ``r``.
    """
    if clip_x0 is not None and clip_x0 <= 0:
        raise ValueError(f"clip_x0 must be positive, got {clip_x0}")
    if dynamic_threshold is not None:
        if not 0 < dynamic_threshold < 1:
            raise ValueError(f"dynamic_threshold must be in (0, 1), got {dynamic_threshold}")
        flat = x0.detach().abs().flatten(1).float()
        r = torch.quantile(flat, dynamic_threshold, dim=1).clamp(min=1)  # (B,)
        if clip_x0 is not None:
            r = r.clamp(max=clip_x0)
        r = r.to(x0.dtype).reshape(-1, *([1] * (x0.ndim - 1)))
        return torch.maximum(torch.minimum(x0, r), -r) / r
    if clip_x0 is not None:
        return x0.clamp(-clip_x0, clip_x0)
    return x0


def _denoise(model: Denoiser, x: Tensor, point: _Point, prediction: str) -> tuple[Tensor, Tensor]:
    """Call the network at one point and return ``(x0, eps)`` estimates."""
    t_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    t = torch.full((x.shape[0],), point.t, dtype=t_dtype, device=x.device)
    output = model(model_input(x, point.alpha_bar, prediction), t)
    if output.shape != x.shape:
        raise ValueError(
            f"the denoiser returned shape {tuple(output.shape)} for input {tuple(x.shape)}"
        )
    return x0_and_eps(output, x, point.alpha_bar, prediction)


def _check(x_T: Tensor, prediction: str) -> None:
    check_prediction(prediction)
    if not x_T.is_floating_point():
        raise ValueError(f"x_T must be a floating-point tensor, got {x_T.dtype}")


def _report(callback, i, steps, here, there, x, denoised) -> None:
    if callback is not None:
        callback(SamplerStep(i, steps, here.t, there.t, x, denoised))


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


def _churn(
    x: Tensor,
    here: _Point,
    schedule: Schedule,
    generator: Generators,
    s_churn: float,
    s_tmin: float,
    s_tmax: float,
    s_noise: float,
    steps: int,
) -> tuple[Tensor, _Point]:
    """Karras et al. (2022) Alg. 2 lines 4-6: raise the noise from sigma to sigma-hat."""
    sigma = here.sigma
    if s_churn <= 0 or not s_tmin <= sigma <= s_tmax or math.isinf(sigma):
        return x, here
    gamma = min(s_churn / steps, math.sqrt(2) - 1)
    sigma_hat = sigma * (1 + gamma)
    x_ve = x / here.a + math.sqrt(sigma_hat**2 - sigma**2) * s_noise * _noise(x, generator)
    ab_hat = 1 / (1 + sigma_hat**2)
    t_hat = float(schedule.sigma_to_t(torch.tensor(sigma_hat)))
    return x_ve * math.sqrt(ab_hat), _Point(t_hat, ab_hat)


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
        sigma, sigma_next = here.sigma, there.sigma
        ratio = sigma_next / sigma  # 0 when sigma is infinite
        sigma_up = min(sigma_next, eta * sigma_next * math.sqrt(max(1 - ratio**2, 0.0)))
        sigma_down = math.sqrt(sigma_next**2 - sigma_up**2)
        x_ve = x0 + sigma_down * eps
        if sigma_up > 0:
            x_ve = x_ve + sigma_up * s_noise * _noise(x, generator)
        x = there.a * x_ve
        _report(callback, i, steps, here, there, x, x0)
    return x


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


SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "euler": sample_euler,
    "heun": sample_heun,
    "euler_ancestral": sample_euler_ancestral,
    "dpmpp_2m": sample_dpmpp_2m,
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
