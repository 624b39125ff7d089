"""Learning-rate schedules: linear warm-up, then constant or cosine decay (Loshchilov &
Hutter 2017), as multipliers of the base rate for ``torch.optim.lr_scheduler.LambdaLR``."""

from __future__ import annotations

import math
from functools import partial

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

LR_SCHEDULES = ("constant", "cosine")


def lr_multiplier(
    step: int, *, warmup_steps: int, schedule: str, total_steps: int | None, min_ratio: float
) -> float:
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def warmup_schedule(
    optimizer: Optimizer,
    *,
    warmup_steps: int = 0,  # linear ramp from lr / warmup_steps to lr
    schedule: str = "constant",  # then constant | cosine
    total_steps: int | None = None,  # cosine: the step where it reaches min_ratio * lr
    min_ratio: float = 0.0,  # cosine floor, as a fraction of the base rate
) -> LambdaLR:
    """A per-step LambdaLR: warm-up, then constant or cosine to ``min_ratio``."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown lr schedule {schedule!r}; choose one of {LR_SCHEDULES}")
    if schedule == "cosine" and not total_steps:
        raise ValueError("the cosine lr schedule needs total_steps (e.g. trainer.max_steps)")
    if warmup_steps < 0 or not 0 <= min_ratio <= 1:
        raise ValueError(
            f"need warmup_steps >= 0 and 0 <= min_ratio <= 1, got {warmup_steps}, {min_ratio}"
        )
    fn = partial(
        lr_multiplier,
        warmup_steps=warmup_steps,
        schedule=schedule,
        total_steps=total_steps,
        min_ratio=min_ratio,
    )
    return LambdaLR(optimizer, fn)
