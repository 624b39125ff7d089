"""Weight files, at the bottom of the package: reading safetensors and pickle checkpoints
(``weights_only`` only, so a file can never run code), telling formats apart by their
bytes, digests, atomic writes, and loading state dicts with errors that name every key.

Every reader raises ``WeightsFileError``, one line naming the file and what is wrong with
it, for a missing, empty, truncated, corrupt or code-carrying file.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import struct
import tempfile
import zipfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

Format = Literal["safetensors", "torch", "pickle", "diffusers"]
_SHOWN = 20  # keys listed in an error before "... and N more"


class WeightsFileError(ValueError):
    """A weights file (or folder) that cannot be read; the message names it and says why."""


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


def weights_digest(modules: Mapping[str, nn.Module]) -> str:
    """SHA-256 (hex) of named modules' weights: every state-dict tensor's name, dtype, shape
    and bytes, in order. Two checkpoints with the same weights get the same digest whatever
    else their files hold (optimizer state, timestamps)."""
    digest = hashlib.sha256()
    for name, module in modules.items():
        for key, value in module.state_dict().items():
            if not isinstance(value, Tensor):
                continue
            digest.update(f"{name}.{key}:{value.dtype}:{tuple(value.shape)};".encode())
            flat = value.detach().cpu().contiguous().reshape(-1)  # 0-d too: a uint8 view
            digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def sniff(path: str | Path) -> Format:
    """What ``path`` holds, from its bytes rather than its name: ``safetensors``, ``torch``
    (``torch.save``'s zip archive), ``pickle`` (torch's legacy format) or ``diffusers`` (a
    folder with ``model_index.json`` or ``config.json``)."""
    path = Path(path)
    if path.is_dir():
        configs = ["model_index.json", "config.json"]
        configs += [f"{part}/config.json" for part in ("unet", "transformer", "vae")]
        if any((path / name).is_file() for name in configs):
            return "diffusers"
        raise WeightsFileError(
            f"{path} is a folder without {', '.join(configs)}: not a diffusers pipeline or "
            "model folder"
        )
    if not path.is_file():
        raise WeightsFileError(f"no weights file at {path}")
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(9)
    if size == 0:
        raise WeightsFileError(f"{path} is empty (0 bytes): an interrupted download or copy?")
    if head.startswith(b"PK\x03\x04"):
        return "torch"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "pickle"
    if len(head) == 9 and head[8:9] == b"{":
        header = struct.unpack("<Q", head[:8])[0]
        if 8 + header > size:
            raise WeightsFileError(
                f"{path} is a truncated safetensors file ({size:,} bytes; its header alone "
                f"says {8 + header:,})"
            )
        return "safetensors"
    raise WeightsFileError(
        f"{path} is not a safetensors file, a torch checkpoint or a pickle (it starts with "
        f"{head[:8]!r})"
    )


def read_pickle(path: str | Path) -> Any:
    """A ``torch.save`` file loaded with ``weights_only=True``: tensors and plain
    containers only; a file carrying code is refused, never run."""
    path = Path(path)
    kind = sniff(path)
    if kind not in ("torch", "pickle"):
        raise WeightsFileError(f"{path} is a {kind} file, not a torch checkpoint")
    try:
        with path.open("rb") as handle:  # a handle: torch would go by a .safetensors name
            return torch.load(handle, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = _unsafe_global(str(err))
        raise WeightsFileError(
            f"{path} holds pickled code or objects other than tensors{found}; loading it "
            "could run code, so it is refused. Use a safetensors copy of the weights."
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, struct.error) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise WeightsFileError(f"{path} is a truncated or corrupt checkpoint ({reason})") from None


def _unsafe_global(message: str) -> str:
    """`` (it names os.system)`` from torch's weights-only refusal, when it says."""
    for line in message.splitlines():
        if "GLOBAL " in line:  # "Unsupported global: GLOBAL x.y" / "unsupported GLOBAL x.y"
            name = line.split("GLOBAL ", 1)[1].split()[0]
            return f" (it names {name})"
    return ""


def read_safetensors(path: str | Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The tensors and the metadata of a ``.safetensors`` file."""
    path = Path(path)
    kind = sniff(path)
    if kind != "safetensors":
        raise WeightsFileError(f"{path} is a {kind} file, not safetensors")
    try:
        with safe_open(str(path), "pt") as handle:
            metadata = dict(handle.metadata() or {})
        return load_file(str(path)), metadata
    except Exception as err:  # safetensors' own error type varies with the version
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise WeightsFileError(f"{path} is a corrupt safetensors file ({reason})") from None


def read_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of a safetensors file (no tensors read); ``{}`` for pickles."""
    path = Path(path)
    if sniff(path) != "safetensors":
        return {}
    try:
        with safe_open(str(path), "pt") as handle:
            return dict(handle.metadata() or {})
    except Exception as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise WeightsFileError(f"{path} is a corrupt safetensors file ({reason})") from None


def read_weights(path: str | Path) -> dict[str, Tensor]:
    """All tensors of a safetensors file or a pickle checkpoint (weights only); a
    Lightning / CompVis checkpoint whose tensors sit under ``state_dict`` is unwrapped."""
    path = Path(path)
    if sniff(path) == "safetensors":
        return read_safetensors(path)[0]
    if path.is_dir():
        raise WeightsFileError(f"{path} is a folder: pass one of its weight files")
    data = read_pickle(path)
    if isinstance(data, Mapping) and isinstance(data.get("state_dict"), Mapping):
        data = data["state_dict"]
    if not isinstance(data, Mapping):
        raise WeightsFileError(f"{path} holds a {type(data).__name__}, not a mapping of tensors")
    return {k: v for k, v in data.items() if isinstance(v, Tensor)}


# Files of ours from before the backbone-neutral names (session 6) called the denoiser
# "unet": networks.unet.*, ema.average.unet.*, adapters' unet.*, snapshots' <i>/unet.*.
_LEGACY_DENOISER = re.compile(r"(^|[./])unet\.")


def legacy_names(tensors: Mapping[str, Any]) -> dict[str, Any]:
    """Tensors of our files with the denoiser under its current name (``denoiser``)."""
    return {_LEGACY_DENOISER.sub(r"\1denoiser.", k, count=1): v for k, v in tensors.items()}


def read_json(path: str | Path) -> dict[str, Any]:
    """A JSON object from a file (a diffusers ``config.json``), named when unreadable."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise WeightsFileError(f"no {path.name} at {path}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise WeightsFileError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise WeightsFileError(f"{path} holds a JSON {type(data).__name__}, not an object")
    return data


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


@contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write; renamed onto ``path`` when the block
    ends, removed when it raises: no reader ever sees a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def save_safetensors(
    path: str | Path, tensors: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None
) -> Path:
    """Write tensors atomically (a temporary file, then a rename): never a half-written file."""
    # safetensors refuses tensors that share storage; contiguous copies are always safe.
    data = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    with atomic_write(path) as tmp:
        save_file(data, str(tmp), metadata=dict(metadata) if metadata else None)
    return Path(path)
