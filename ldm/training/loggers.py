"""Experiment trackers: Weights & Biases offline by default, online when logged in."""

from __future__ import annotations

import os
from typing import Any

from lightning.pytorch.loggers import WandbLogger

WANDB_MODES = ("auto", "online", "offline")


def wandb_logged_in() -> bool:
    """Whether wandb has an API key here (``WANDB_API_KEY`` or ``wandb login``'s netrc
    entry), without touching the network."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        import netrc

        entry = netrc.netrc().authenticators("api.wandb.ai")
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return bool(entry and entry[2])


def wandb_logger(
    project: str = "ldm",
    name: str | None = None,
    save_dir: str = ".",
    mode: str = "auto",  # auto: online when logged in, else offline (no account needed)
    **kwargs: Any,
) -> WandbLogger:
    """A Lightning ``WandbLogger``; offline runs are synced later with ``wandb sync``."""
    if mode not in WANDB_MODES:
        raise ValueError(f"wandb mode must be one of {WANDB_MODES}, got {mode!r}")
    offline = mode == "offline" or (mode == "auto" and not wandb_logged_in())
    return WandbLogger(project=project, name=name, save_dir=save_dir, offline=offline, **kwargs)
