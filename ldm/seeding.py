"""Numbers fixed by their inputs alone: the same in every process, run and machine
(SHA-256; Python's ``hash()`` is salted per process and would differ across DDP ranks)."""

from __future__ import annotations

import hashlib


def stable_seed(*parts: object) -> int:
    """A non-negative 63-bit seed (fits ``torch.Generator.manual_seed``) for ``parts``."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "big") >> 1


def stable_fraction(*parts: object) -> float:
    """A number in [0, 1) for ``parts`` (split assignment by hash)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64
