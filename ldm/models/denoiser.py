"""What every denoiser backbone (UNet, DiT, MMDiT) shares: the conditioning inputs it was
built for, checked the same way, and gradient checkpointing of its blocks."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


def check_conditioning(model: nn.Module, y: Tensor | None, pooled: Tensor | None) -> None:
    """Class labels and pooled vectors exactly when ``model`` was built for them
    (``num_classes``, ``pooled_dim``)."""
    name = type(model).__name__
    if (y is None) != (model.num_classes is None):
        raise ValueError(
            f"class labels y are required exactly when the {name} has num_classes "
            f"(num_classes={model.num_classes}, y given: {y is not None})"
        )
    if (pooled is None) != (model.pooled_dim is None):
        raise ValueError(
            f"a pooled vector is required exactly when the {name} has pooled_dim "
            f"(pooled_dim={model.pooled_dim}, pooled given: {pooled is not None})"
        )


def run_block(model: nn.Module, block: nn.Module, *args: Any) -> Any:
    """``block(*args)``, recomputed in backward when ``model.gradient_checkpointing`` is
    on and it trains with gradients (the same gradients, less memory)."""
    if model.gradient_checkpointing and model.training and torch.is_grad_enabled():
        return checkpoint(block, *args, use_reentrant=False)
    return block(*args)
