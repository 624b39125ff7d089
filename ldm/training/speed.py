"""Speed options of the training modules (channels-last weights, ``torch.compile``) and
what measures them: FLOPs of a step and model FLOPs utilisation (MFU).

The options act in place and keep parameter objects and state-dict keys, so optimizers, EMA
copies, checkpoints and weight conversion see the same network. What each is worth on a
CPU and against diffusers is measured by ``benchmarks/vs_diffusers.py`` (docs/performance.md).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

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


# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' data sheets, by a
# substring of torch.cuda.get_device_name(); the first match wins, so specific names first.
PEAK_BF16_TFLOPS: dict[str, float] = {
    "H200 NVL": 835.6,
    "H200": 989.4,  # SXM (and GH200)
    "H100 PCIe": 756.5,
    "H100 NVL": 835.6,
    "H100": 989.4,  # SXM
    "A100": 312.0,
    "L40S": 362.1,
    "L40": 181.0,
    "L4": 121.0,
    "A10": 125.0,
}


def peak_tflops(device: torch.device | str | None = None) -> float | None:
    """The published dense bf16 peak of a CUDA ``device`` (TFLOP/s), or None when it is
    unknown (a CPU, an unlisted GPU): then give the peak yourself."""
    device = torch.device(device if device is not None else "cuda")
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS.items() if key in name), None)


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of ``fn`` (forward and, if it calls it, backward), counted by
    ``torch.utils.flop_counter``: matmuls, convolutions and attention, 2 per multiply-add;
    elementwise work, norms and optimizer updates are not counted (the MFU convention)."""
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())


def mfu(flops: float, seconds: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: ``flops`` done in ``seconds`` as a fraction of ``peak``
    TFLOP/s (None when the peak is unknown)."""
    if peak is None or seconds <= 0:
        return None
    return flops / seconds / (peak * 1e12)
