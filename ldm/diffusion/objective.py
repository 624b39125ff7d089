"""The forward process, prediction targets and their conversions, and loss weights.

Variance-preserving notation: ``x_t = a x0 + s eps`` with ``a = sqrt(alpha_bar)`` and
``s = sqrt(1 - alpha_bar)``. Targets: ``eps``, ``x0`` and ``v = a eps - s x0``
(Salimans & Ho 2022), and ``flow``: the velocity ``u = eps - x0`` of rectified flow
(Liu et al. 2023; Esser et al. 2024), whose network sees the flow state
``x_flow = (1 - tau) x0 + tau eps`` with ``tau = s / (a + s)``: the VP state divided by
``a + s`` (``model_input``). Karras et al. (2022) write the same process as
``x_ve = x_t / a = x0 + sigma eps`` with ``sigma = s / a``: their "denoised" output
``D(x_ve; sigma)`` is the ``x0`` prediction and their ODE derivative
``(x_ve - D) / sigma`` is the ``eps`` prediction. Loss weights: uniform and min-SNR-gamma
(Hang et al. 2023).

Every function takes ``alpha_bar`` as a tensor of shape (B,) (or a scalar) and computes
its coefficients in float64 before casting to the data's dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

PREDICTIONS = ("eps", "x0", "v", "flow")
LOSS_WEIGHTINGS = ("uniform", "min_snr")


def check_prediction(prediction: str) -> None:
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction type {prediction!r}; choose one of {PREDICTIONS}")


def vp_coefficients(alpha_bar: Tensor | float, like: Tensor) -> tuple[Tensor, Tensor]:
    """``(a, s)`` as float64 -> ``like.dtype`` tensors broadcastable against ``like``."""
    ab = torch.as_tensor(alpha_bar, dtype=torch.float64, device=like.device)
    if ab.ndim == 1 and like.ndim > 1:
        ab = ab.reshape(-1, *([1] * (like.ndim - 1)))  # (B, 1, ..., 1)
    elif ab.ndim > 1:
        raise ValueError(f"alpha_bar must be a scalar or have shape (B,), got {tuple(ab.shape)}")
    return ab.sqrt().to(like.dtype), (1 - ab).sqrt().to(like.dtype)


def input_scale(alpha_bar: Tensor | float, prediction: str, like: Tensor) -> Tensor:
    """What the network sees over the VP state: 1, or ``1 / (a + s)`` for ``flow``
    (broadcastable against ``like``)."""
    if prediction != "flow":
        return torch.ones((), dtype=like.dtype, device=like.device)
    a, s = vp_coefficients(alpha_bar, like)
    return 1 / (a + s)


def model_input(x_t: Tensor, alpha_bar: Tensor | float, prediction: str) -> Tensor:
    """What the network sees at the VP state ``x_t``: ``x_t`` itself, or for ``flow`` the
    flow state ``x_t / (a + s)``."""
    return x_t if prediction != "flow" else x_t * input_scale(alpha_bar, prediction, x_t)


def vp_to_ve(x_t: Tensor, alpha_bar: Tensor | float) -> tuple[Tensor, Tensor]:
    """Karras' variance-exploding state and noise level: ``(x_t / a, sigma)``."""
    a, s = vp_coefficients(alpha_bar, x_t)
    return x_t / a, s / a


def q_sample(x0: Tensor, noise: Tensor, alpha_bar: Tensor | float) -> Tensor:
    """Diffuse clean data to ``x_t = a x0 + s noise``."""
    a, s = vp_coefficients(alpha_bar, x0)
    return a * x0 + s * noise


def target(prediction: str, x0: Tensor, noise: Tensor, alpha_bar: Tensor | float) -> Tensor:
    """The regression target for ``prediction`` given the clean data and the noise."""
    check_prediction(prediction)
    if prediction == "eps":
        return noise
    if prediction == "x0":
        return x0
    if prediction == "flow":
        return noise - x0
    a, s = vp_coefficients(alpha_bar, x0)
    return a * noise - s * x0


def _has_zero_snr(alpha_bar: Tensor | float) -> bool:
    return bool((torch.as_tensor(alpha_bar) == 0).any())


def convert(
    output: Tensor, x_t: Tensor, alpha_bar: Tensor | float, *, src: str, dst: str
) -> Tensor:
    """Turn a ``src`` prediction (``eps``, ``x0``, ``v`` or ``flow``) at the VP state ``x_t``
    into a ``dst`` one.

    At zero SNR (``alpha_bar = 0``) an ``eps`` prediction is always ``x_t`` and carries no
    information about ``x0``, so converting from it raises; use ``v`` or ``x0`` there
    (Lin et al. 2023, Sec. 3.2).
    """
    check_prediction(src)
    check_prediction(dst)
    if src == dst:
        return output
    a, s = vp_coefficients(alpha_bar, x_t)
    if src == "eps" and _has_zero_snr(alpha_bar):
        raise ValueError(
            "cannot recover x0 from an eps prediction at zero SNR (alpha_bar = 0): "
            "train with prediction='v' or 'x0' for zero-terminal-SNR schedules"
        )
    if src == "eps":
        x0 = (x_t - s * output) / a
        eps = output
    elif src == "x0":
        x0 = output
        eps = (x_t - a * output) / s
    elif src == "v":
        x0 = a * x_t - s * output
        eps = s * x_t + a * output
    else:  # flow: x_flow = x_t / (a + s), x0 = x_flow - tau u, eps = x_flow + (1 - tau) u
        x0 = (x_t - s * output) / (a + s)
        eps = (x_t + a * output) / (a + s)
    if dst == "x0":
        return x0
    if dst == "eps":
        return eps
    if dst == "flow":
        return eps - x0
    return a * eps - s * x0


def x0_and_eps(
    output: Tensor, x_t: Tensor, alpha_bar: Tensor | float, prediction: str
) -> tuple[Tensor, Tensor]:
    """Both the denoised estimate (``x0``) and the noise estimate from one model output."""
    if prediction == "eps":
        return convert(output, x_t, alpha_bar, src="eps", dst="x0"), output
    return (
        convert(output, x_t, alpha_bar, src=prediction, dst="x0"),
        convert(output, x_t, alpha_bar, src=prediction, dst="eps"),
    )


def loss_weights(
    snr: Tensor, prediction: str, weighting: str = "uniform", gamma: float = 5.0
) -> Tensor:
    """Per-sample weights on the MSE of the ``prediction`` target.

    ``min_snr`` (Hang et al. 2023) weighs every timestep like an x0 loss of weight
    ``min(SNR, gamma)``; on the eps target that is ``min(SNR, gamma) / SNR``, on the v
    target ``min(SNR, gamma) / (SNR + 1)``, on the flow target (whose error is the x0 error
    over ``tau``) ``min(SNR, gamma) tau^2 = min(SNR, gamma) / (1 + sqrt(SNR))^2``. Written
    to stay finite at SNR = 0.
    """
    check_prediction(prediction)
    if weighting not in LOSS_WEIGHTINGS:
        raise ValueError(f"unknown loss weighting {weighting!r}; choose one of {LOSS_WEIGHTINGS}")
    snr = torch.as_tensor(snr, dtype=torch.float64)
    if weighting == "uniform":
        return torch.ones_like(snr)
    if gamma <= 0:
        raise ValueError(f"min_snr gamma must be positive, got {gamma}")
    clipped = snr.clamp(max=gamma)
    if prediction == "x0":
        return clipped
    if prediction == "v":
        return clipped / (snr + 1)
    if prediction == "flow":
        return clipped / (1 + snr.sqrt()) ** 2
    return torch.where(snr > gamma, gamma / snr, torch.ones_like(snr))  # min(SNR, g) / SNR


def diffusion_loss(
    output: Tensor,
    x0: Tensor,
    noise: Tensor,
    alpha_bar: Tensor,
    *,
    prediction: str,
    weighting: str = "uniform",
    gamma: float = 5.0,
    sample_weights: Tensor | None = None,
) -> Tensor:
    """Weighted mean squared error between a model output and its target (a scalar);
    ``sample_weights`` (B,) scale each sample's term (e.g. DreamBooth's prior loss)."""
    goal = target(prediction, x0, noise, alpha_bar)
    per_sample = (output.float() - goal.float()).pow(2).flatten(1).mean(1)  # (B,)
    alpha_bar = torch.as_tensor(alpha_bar, dtype=torch.float64, device=output.device)
    snr = alpha_bar / (1 - alpha_bar)
    weights = loss_weights(snr, prediction, weighting, gamma).to(per_sample)
    if sample_weights is not None:
        weights = weights * sample_weights.to(per_sample)
    return (weights * per_sample).mean()
