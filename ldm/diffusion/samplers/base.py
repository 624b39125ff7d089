"""What every sampler shares: the denoiser and callback types, sampling points, noise,
thresholding, one network call, Karras' churn."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

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
    """Karras et al. (2022) Alg. 2 lines 4-6: raise the noise from sigma to sigma-hat. As
    there (and in k-diffusion), a noise tensor is drawn at every step once ``s_churn > 0``,
    inside the churn window or not, so the streams agree."""
    sigma = here.sigma
    if s_churn <= 0:
        return x, here
    noise = _noise(x, generator)
    if not s_tmin <= sigma <= s_tmax or math.isinf(sigma):
        return x, here
    gamma = min(s_churn / steps, math.sqrt(2) - 1)
    sigma_hat = sigma * (1 + gamma)
    x_ve = x / here.a + math.sqrt(sigma_hat**2 - sigma**2) * s_noise * noise
    hat = _at_sigma(schedule, sigma_hat)
    return x_ve * hat.a, hat


def _at_sigma(schedule: Schedule, sigma: float) -> _Point:
    """The point at Karras noise level ``sigma`` (a fractional timestep of ``schedule``)."""
    t = float(schedule.sigma_to_t(torch.tensor(sigma, dtype=torch.float64)))
    return _Point(t, 1 / (1 + sigma**2))


def _ancestral(sigma: float, sigma_next: float, eta: float) -> tuple[float, float]:
    """k-diffusion's ``get_ancestral_step``: ``(sigma_down, sigma_up)`` with
    ``sigma_down^2 + sigma_up^2 = sigma_next^2``; ``eta = 1`` is DDPM's noise."""
    ratio = sigma_next / sigma  # 0 when sigma is infinite
    sigma_up = min(sigma_next, eta * sigma_next * math.sqrt(max(1 - ratio**2, 0.0)))
    return math.sqrt(sigma_next**2 - sigma_up**2), sigma_up
