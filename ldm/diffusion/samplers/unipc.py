"""UniPC (Zhao et al. 2023): the unified predictor-corrector in data prediction over the
half log-SNR ``lambda``, as diffusers' ``UniPCMultistepScheduler`` runs it."""

from __future__ import annotations

import itertools
import math

import torch
from torch import Tensor

from ldm.diffusion.samplers.base import (
    Callback,
    Denoiser,
    Generators,
    _check,
    _denoise,
    _Point,
    _points,
    _report,
)
from ldm.diffusion.schedules import Schedule


def _coefficients(h: float, rks: list[float], order: int, variant: str) -> tuple[Tensor, float]:
    """The linear system of UniP / UniC (Zhao et al. 2023, Alg. 2-3; B(h) = h for ``bh1``,
    ``e^h - 1`` for ``bh2``): ``R`` has rows ``rks^(i-1)``, ``b_i = i! phi_{i+1}(-h) / B(h)``.
    Returns ``(R, b)`` stacked and ``B(h)``; ``rks`` ends with 1."""
    hh = -h
    h_phi = math.expm1(hh) / hh - 1
    factorial = 1
    b_h = hh if variant == "bh1" else math.expm1(hh)
    rows, b = [], []
    r = torch.tensor(rks, dtype=torch.float64)
    for i in range(1, order + 1):
        rows.append(r ** (i - 1))
        b.append(h_phi * factorial / b_h)
        factorial *= i + 1
        h_phi = h_phi / hh - 1 / factorial
    return torch.stack(rows), torch.tensor(b, dtype=torch.float64), b_h


def _update(
    x: Tensor,
    here: _Point,
    there: _Point,
    history: list[tuple[_Point, Tensor]],
    order: int,
    variant: str,
    x0_there: Tensor | None = None,
) -> Tensor:
    """UniP (``x0_there`` None) or UniC from ``here`` (the newest entry of ``history``, the
    denoised estimates newest last) to ``there``: ``x' = (s'/s) x - a' (e^{-h} - 1) m0 -
    a' B(h) sum_k rho_k D_k``."""
    h = there.lam - here.lam
    m0 = history[-1][1]
    rks, differences = [], []
    for k in range(1, order):
        point, estimate = history[-1 - k]
        rk = (point.lam - here.lam) / h
        rks.append(rk)
        differences.append((estimate - m0) / rk)
    R, b, b_h = _coefficients(h, [*rks, 1.0], order, variant)
    x = (there.s / here.s) * x - there.a * math.expm1(-h) * m0
    if x0_there is None:  # predictor: order - 1 terms
        if not differences:
            return x
        rhos = [0.5] if order == 2 else torch.linalg.solve(R[:-1, :-1], b[:-1]).tolist()
        correction = sum(rho * d for rho, d in zip(rhos, differences, strict=True))
    else:  # corrector: the new estimate's difference too
        rhos = [0.5] if order == 1 else torch.linalg.solve(R, b).tolist()
        correction = rhos[-1] * (x0_there - m0)
        for rho, d in zip(rhos[:-1], differences, strict=True):
            correction = correction + rho * d
    return x - there.a * b_h * correction


def sample_unipc(
    model: Denoiser,
    x_T: Tensor,
    schedule: Schedule,
    *,
    steps: int,
    prediction: str = "eps",
    spacing: str = "karras",
    order: int = 2,
    variant: str = "bh2",
    corrector: bool = True,
    lower_order_final: bool = True,
    generator: Generators = None,
    callback: Callback | None = None,
    **spacing_opts,
) -> Tensor:
    """UniPC-``order`` (1-3) with ``variant`` ``bh1`` or ``bh2``: a multistep predictor
    (UniP) and, once a step lands, a corrector (UniC) that reuses the network's estimate at
    the new point, so it costs no extra call: ``steps`` calls. The orders warm up from 1 and,
    with ``lower_order_final``, come down over the last steps (diffusers' defaults; bh2 is
    its recommendation for guided sampling, bh1 for unconditional). The step out of
    ``sigma = inf`` (zero terminal SNR) is the exact DDIM step and starts the history."""
    _check(x_T, prediction)
    if order not in (1, 2, 3):
        raise ValueError(f"UniPC order must be 1, 2 or 3, got {order}")
    if variant not in ("bh1", "bh2"):
        raise ValueError(f"UniPC variant must be 'bh1' or 'bh2', got {variant!r}")
    points = _points(schedule, steps, spacing, **spacing_opts)
    x = x_T
    history: list[tuple[_Point, Tensor]] = []  # (point, denoised estimate), newest last
    last: tuple[Tensor, int] | None = None  # the state before the last UniP step, its order
    for i, (here, there) in enumerate(itertools.pairwise(points)):
        x0, eps = _denoise(model, x, here, prediction)
        if here.alpha_bar == 0:
            x = there.a * x0 + there.s * eps
            _report(callback, i, steps, here, there, x, x0)
            continue
        if corrector and last is not None:
            x = _update(last[0], history[-1][0], here, history, last[1], variant, x0)
        history = [*history, (here, x0)][-order:]
        this_order = min(order, steps - i) if lower_order_final else order
        this_order = min(this_order, len(history))
        if there.alpha_bar == 1:  # into the clean data (h = inf) only first order is finite
            this_order = 1
        last = (x, this_order)
        x = _update(x, here, there, history, this_order, variant)
        _report(callback, i, steps, here, there, x, x0)
    return x
