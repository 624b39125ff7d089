"""Speed options of the training modules: channels-last weights and ``torch.compile``.

Both act in place and keep parameter objects and state-dict keys, so optimizers, EMA
copies, checkpoints and weight conversion see the same network. What each is worth on a
CPU and against diffusers is measured by ``benchmarks/vs_diffusers.py`` (docs/performance.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compile_options(setting: bool | str | Mapping[str, Any] | None) -> dict[str, Any] | None:
    """``torch.compile`` keyword arguments for a config value: false / null (off), true
    (default mode), a mode name, or a mapping of ``torch.compile`` arguments."""
    if setting is None or setting is False:
        return None
    if setting is True:
        return {}
    if isinstance(setting, str):
        if setting not in COMPILE_MODES:
            raise ValueError(f"compile={setting!r}: use true, false or a mode of {COMPILE_MODES}")
        return {"mode": setting}
    if isinstance(setting, Mapping):
        return dict(setting)
    raise ValueError(f"compile={setting!r}: use true, false, a mode name or a mapping")


def to_channels_last(network: nn.Module) -> nn.Module:
    """Convolution weights (and any 4-d tensor) in channels-last layout, in place. Inputs
    need no conversion: a convolution with channels-last weights returns channels-last
    activations, which the following layers keep."""
    return network.to(memory_format=torch.channels_last)


def compile_network(network: nn.Module, setting: bool | str | Mapping[str, Any] | None) -> bool:
    """Compile ``network``'s forward in place (``nn.Module.compile``: same parameters and
    state-dict keys); returns whether it did. Compilation happens at the first call."""
    options = compile_options(setting)
    if options is None:
        return False
    network.compile(**options)
    return True
