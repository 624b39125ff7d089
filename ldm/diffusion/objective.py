"""The forward process, prediction targets and their conversions, and loss weights.

Variance-preserving notation: ``x_t = a x0 + s eps`` with ``a = sqrt(alpha_bar)`` and
``s = sqrt(1 - alpha_bar)``. Targets: ``eps``, ``x0`` and ``v = a eps - s x0``
(Salimans & Ho 2022), and ``flow``: the velocity ``u = eps - x0`` of rectified flow
(Liu et al. 2023; Esser et al. 2024), whose network sees the flow state
``x_flow = (1 - tau) x0 + tau eps`` with ``tau = s / (a + s)``: the VP state divided by
``a + s`` (``model_input``); and ``edm``: the raw output ``F`` of Karras et al. (2022)'s
preconditioned network, ``D = c_skip x_ve + c_out F(c_in x_ve, c_noise)`` with
``sigma_data = 0.5`` (``edm_coefficients``). Karras et al. (2022) write the same process as
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

PREDICTIONS = ("eps", "x0", "v", "flow", "edm")
EDM_SIGMA_DATA = 0.5  # Karras et al. (2022)'s sigma_data: the data's standard deviation
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


def edm_coefficients(
    alpha_bar: Tensor | float, like: Tensor, sigma_data: float = EDM_SIGMA_DATA
) -> tuple[Tensor, Tensor, Tensor]:
    """EDM's preconditioning (Karras et al. 2022, Table 1) in VP terms: ``(c_in, c_skip,
    c_out)`` such that the network sees ``c_in x_t`` and ``x0 = c_skip x_t + c_out F``. With
    ``sigma = s / a`` and ``x_ve = x_t / a`` these are the paper's ``c_in(sigma) =
    1 / sqrt(sigma^2 + sigma_data^2)`` on ``x_ve``, ``c_skip(sigma) = sigma_data^2 /
    (sigma^2 + sigma_data^2)`` on ``x_ve`` and ``c_out(sigma) = sigma sigma_data /
    sqrt(sigma^2 + sigma_data^2)``."""
    a, s = vp_coefficients(alpha_bar, like)
    norm = (s**2 + (a * sigma_data) ** 2).sqrt()  # a sqrt(sigma^2 + sigma_data^2)
    return 1 / norm, a * sigma_data**2 / norm**2, s * sigma_data / norm


def input_scale(alpha_bar: Tensor | float, prediction: str, like: Tensor) -> Tensor:
    """What the network sees over the VP state: 1, ``1 / (a + s)`` for ``flow``, EDM's
    ``c_in`` for ``edm`` (broadcastable against ``like``)."""
    if prediction == "edm":
        return edm_coefficients(alpha_bar, like)[0]
    if prediction != "flow":
        return torch.ones((), dtype=like.dtype, device=like.device)
    a, s = vp_coefficients(alpha_bar, like)
    return 1 / (a + s)


def model_input(x_t: Tensor, alpha_bar: Tensor | float, prediction: str) -> Tensor:
    """What the network sees at the VP state ``x_t``: ``x_t`` itself, the flow state
    ``x_t / (a + s)`` for ``flow``, ``c_in x_ve`` for ``edm``."""
    if prediction not in ("flow", "edm"):
        return x_t
    return x_t * input_scale(alpha_bar, prediction, x_t)


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
    if prediction == "edm":  # F = (x0 - c_skip x_t) / c_out
        _, c_skip, c_out = edm_coefficients(alpha_bar, x0)
        return (x0 - c_skip * q_sample(x0, noise, alpha_bar)) / c_out
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
    elif src == "flow":  # x_flow = x_t / (a + s), x0 = x_flow - tau u, eps = x_flow + (1 - tau) u
        x0 = (x_t - s * output) / (a + s)
        eps = (x_t + a * output) / (a + s)
    else:  # edm
        _, c_skip, c_out = edm_coefficients(alpha_bar, x_t)
        x0 = c_skip * x_t + c_out * output
        eps = (x_t - a * x0) / s
    if dst == "x0":
        return x0
    if dst == "eps":
        return eps
    if dst == "flow":
        return eps - x0
    if dst == "edm":
        _, c_skip, c_out = edm_coefficients(alpha_bar, x_t)
        return (x0 - c_skip * x_t) / c_out
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
    over ``tau``) ``min(SNR, gamma) tau^2 = min(SNR, gamma) / (1 + sqrt(SNR))^2``, on EDM's
    ``F`` (x0 error ``c_out`` times its error) ``min(SNR, gamma) c_out^2``. Written to stay
    finite at SNR = 0. EDM's own weighting is ``uniform`` on ``F``: the paper's
    ``lambda(sigma) = 1 / c_out^2`` on the x0 error.
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
    if prediction == "edm":  # c_out^2 = sigma_data^2 / (1 + SNR sigma_data^2)
        return clipped * EDM_SIGMA_DATA**2 / (1 + snr * EDM_SIGMA_DATA**2)
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
