"""Exponential moving average of a network's weights (Polyak averaging; as in DDPM and LDM).

The average lives in a frozen copy of the network, a submodule of the LightningModule, so
it moves with the model between devices, is saved and restored with it, and samples
directly. The decay warms up as ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates
(the schedule of the TensorFlow / LDM implementations), so early averages are not stuck at
the random initialisation.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA(nn.Module):
    """``EMA(network, decay)``; call ``update(network)`` after each optimizer step."""

    def __init__(self, network: nn.Module, decay: float = 0.9999, warmup: bool = True):
        super().__init__()
        if not 0 <= decay < 1:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay, self.warmup = decay, warmup
        self.average = copy.deepcopy(network).eval().requires_grad_(False)
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))
        self._count: int | None = 0  # see count()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._count = None  # read ``updates`` once, at the next count()

    def count(self) -> int:
        """Updates so far, kept on the host: reading the ``updates`` buffer of a GPU copy
        every step would make each step wait for the device."""
        if self._count is None:
            self._count = int(self.updates)
        return self._count

    def current_decay(self) -> float:
        n = self.count()
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, network: nn.Module, decay: float | None = None) -> None:
        """One step towards ``network``'s weights with ``decay`` (default: the configured
        decay, warmed up)."""
        decay = self.current_decay() if decay is None else decay
        averaged = dict(self.average.named_parameters())
        targets, sources = [], []
        for name, param in network.named_parameters():
            target = averaged[name]
            if param.requires_grad:
                targets.append(target)
                sources.append(param.detach().to(target.dtype))
            else:  # frozen weights (e.g. a LoRA's base) are copied, not averaged
                target.copy_(param.detach())
        if targets:  # one vectorised update instead of a kernel launch per tensor
            torch._foreach_lerp_(targets, sources, 1 - decay)
        averaged_buffers = dict(self.average.named_buffers())
        for name, buffer in network.named_buffers():
            averaged_buffers[name].copy_(buffer)
        self.updates += 1
        self._count = self.count() + 1

    def train(self, mode: bool = True) -> EMA:
        """The average always stays in eval mode."""
        super().train(mode)
        self.average.eval()
        return self
