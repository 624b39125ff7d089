"""Classifier-free guidance (Ho & Salimans 2022) as a denoiser wrapper.

``cfg(model, cond, uncond, scale)`` closes over the conditioning and returns the plain
``denoiser(x_t, t)`` that samplers take, so samplers never see text. The conditional and
unconditional passes run as one batch. Guidance rescale is Lin et al. (2023), Sec. 3.4.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from ldm.diffusion.samplers import Denoiser

# What a conditioner gives the UNet: keyword arguments among "context", "y", "pooled".
Conditioning = dict[str, Tensor]
# What guidance takes: those keyword arguments, one positional tensor, or nothing.
GuidanceInput = Tensor | Mapping[str, Any] | None


def _call(model: Callable[..., Tensor], x: Tensor, t: Tensor, cond: GuidanceInput) -> Tensor:
    if isinstance(cond, Mapping):
        return model(x, t, **cond)
    return model(x, t, cond)


def _cat(uncond: GuidanceInput, cond: GuidanceInput) -> GuidanceInput:
    """Stack unconditional over conditional inputs along the batch, field by field."""
    if isinstance(cond, Mapping):
        if not isinstance(uncond, Mapping) or set(uncond) != set(cond):
            raise ValueError(
                "cond and uncond must carry the same fields, got "
                f"{sorted(cond)} and {sorted(uncond) if isinstance(uncond, Mapping) else uncond}"
            )
        return {key: _cat(uncond[key], cond[key]) for key in cond}
    if cond is None or uncond is None:
        if cond is not uncond:
            raise ValueError("cond and uncond must both be given or both be None")
        return None
    if uncond.shape[1:] != cond.shape[1:]:
        raise ValueError(
            f"cond {tuple(cond.shape)} and uncond {tuple(uncond.shape)} differ past the batch "
            "dimension; pad both to the same token length"
        )
    if uncond.shape[0] != cond.shape[0]:
        uncond = uncond.expand(cond.shape[0], *uncond.shape[1:])  # one uncond for all
    return torch.cat([uncond, cond])


def rescale_guidance(guided: Tensor, cond_output: Tensor, rescale: float) -> Tensor:
    """Lin et al. (2023) Eq. 15-16: match the guided output's std to the conditional one's."""
    dims = list(range(1, guided.ndim))
    factor = cond_output.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True)
    return guided * (rescale * factor + (1 - rescale))


def cfg(
    model: Callable[..., Tensor],
    cond: GuidanceInput,
    uncond: GuidanceInput,
    scale: float,
    *,
    rescale: float = 0.0,
) -> Denoiser:
    """A denoiser ``uncond_out + scale * (cond_out - uncond_out)``.

    ``model(x, t, cond)`` is called with a tensor ``cond``, or ``model(x, t, **cond)`` with
    a mapping (e.g. ``{"context": tokens, "y": labels}``). An ``uncond`` with batch size 1
    is shared by every sample. ``scale = 1`` runs the conditional pass alone. ``rescale``
    in [0, 1] applies guidance rescale to the raw model output.
    """
    if not 0 <= rescale <= 1:
        raise ValueError(f"guidance rescale must be in [0, 1], got {rescale}")

    def denoiser(x: Tensor, t: Tensor) -> Tensor:
        if scale == 1:
            return _call(model, x, t, cond)
        both = _call(model, torch.cat([x, x]), torch.cat([t, t]), _cat(uncond, cond))
        out_uncond, out_cond = both.chunk(2)
        guided = out_uncond + scale * (out_cond - out_uncond)
        if rescale > 0:
            guided = rescale_guidance(guided, out_cond, rescale)
        return guided

    return denoiser
