"""Reading weight files safely and loading state dicts with errors that name every key.

Pickle-based files (``.ckpt``, ``.pt``, ``.pth``, ``.bin``) load with
``torch.load(weights_only=True)`` only, so a checkpoint can never run code.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

_SHOWN = 20  # keys listed in an error before "... and N more"


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOWN])
    return shown + (f", ... and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else "")


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's bytes (hex), read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_weights(path: str | Path) -> dict[str, Tensor]:
    """All tensors of a ``.safetensors`` file or a pickle checkpoint (weights only).

    A Lightning / CompVis ``.ckpt`` whose tensors sit under ``state_dict`` is unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no weights file at {path}")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{path} holds pickled objects other than tensors, and loading it could run code; "
            f"refused (torch.load(weights_only=True) said: {str(err).splitlines()[0]}). "
            "Convert it to .safetensors where you trust it, or get a safetensors copy."
        ) from None
    if (
        isinstance(data, Mapping)
        and "state_dict" in data
        and isinstance(data["state_dict"], Mapping)
    ):
        data = data["state_dict"]
    if not isinstance(data, Mapping):
        raise ValueError(f"{path} holds a {type(data).__name__}, not a mapping of tensors")
    return {k: v for k, v in data.items() if isinstance(v, Tensor)}


def load_into(
    module: nn.Module, state_dict: Mapping[str, Tensor], *, strict: bool = True, what: str = ""
) -> tuple[list[str], list[str]]:
    """``module.load_state_dict`` whose error lists every missing and unexpected key.

    Returns ``(missing, unexpected)``; with ``strict=False`` they are returned, not raised.
    Shape mismatches always raise, naming the key and both shapes.
    """
    own = module.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    wrong = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state_dict))
        if state_dict[k].shape != own[k].shape
    ]
    label = f" ({what})" if what else ""
    if wrong:
        raise ValueError(
            f"shape mismatch loading {type(module).__name__}{label}: {_listing(wrong)}"
        )
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s): {_listing(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} key(s): {_listing(unexpected)}")
        raise ValueError(
            f"checkpoint does not fit {type(module).__name__}{label}: {'; '.join(parts)}. "
            "Check the preset matches the checkpoint, or pass strict=False to load what fits."
        )
    module.load_state_dict(dict(state_dict), strict=False)
    return missing, unexpected


def save_safetensors(
    path: str | Path, tensors: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None
) -> Path:
    """Write tensors atomically (a temporary file, then a rename): never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # safetensors refuses tensors that share storage; contiguous copies are always safe.
    data = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        save_file(data, tmp, metadata=dict(metadata) if metadata else None)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
