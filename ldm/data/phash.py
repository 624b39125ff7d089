"""Image fingerprints for de-duplication.

* ``content_hash``: SHA-256 of the decoded RGB pixels and the size. Equal for byte copies
  and for lossless re-encodings (a PNG saved again, a JPEG's pixels saved as PNG); blind to
  file names, metadata and container format.
* ``phash``: the DCT perceptual hash (Zauner 2010; the algorithm of the ``imagehash``
  library's ``phash``): greyscale, Lanczos downscale to 32x32, 2-D DCT-II, the 8x8 lowest
  frequencies compared with their median -> 64 bits. Resizing, re-compression and small
  colour changes move it by a few bits; different pictures differ in about half of them.
"""

from __future__ import annotations

import hashlib
from functools import cache

import numpy as np
from PIL import Image

DCT_SIZE = 32  # side of the greyscale thumbnail the DCT is taken of
HASH_SIZE = 8  # side of the low-frequency block kept: 8x8 = 64 bits
_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def content_hash(image: Image.Image) -> str:
    """Hex SHA-256 of an RGB image's size and pixel bytes."""
    if image.mode != "RGB":
        raise ValueError(f"content_hash takes RGB images, got mode {image.mode}")
    digest = hashlib.sha256(f"{image.width}x{image.height}:".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


@cache
def _dct_matrix(n: int) -> np.ndarray:
    """(n, n) unnormalised DCT-II: row k is cos(pi (2i + 1) k / 2n) (scipy's ``dct`` / 2)."""
    k, i = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    return np.cos(np.pi * (2 * i + 1) * k / (2 * n))


def phash(image: Image.Image) -> int:
    """64-bit DCT perceptual hash; bit ``63 - (8 row + col)`` is coefficient (row, col)."""
    thumb = image.convert("L").resize((DCT_SIZE, DCT_SIZE), Image.Resampling.LANCZOS)
    pixels = np.asarray(thumb, dtype=np.float64)  # (32, 32)
    basis = _dct_matrix(DCT_SIZE)
    low = (basis @ pixels @ basis.T)[:HASH_SIZE, :HASH_SIZE]  # (8, 8), DC at [0, 0]
    bits = (low > np.median(low)).ravel()
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def _popcount(values: np.ndarray) -> np.ndarray:
    """Set bits of each uint64 (numpy >= 2 has a ufunc; older ones count bytes by table)."""
    if hasattr(np, "bitwise_count"):
        return np.bitwise_count(values)
    return _POPCOUNT[values.view(np.uint8)].reshape(-1, 8).sum(axis=1)


class Duplicates:
    """Exact duplicates (same content hash) and near duplicates (pHash within ``max_bits``)
    of the images kept so far; ``max_bits=None`` looks for exact duplicates only.

    Near duplicates are found by a vectorised linear scan: about 0.1 ms per lookup among
    100,000 kept images.
    """

    def __init__(self, max_bits: int | None = 6):
        self.max_bits = max_bits
        self._first: dict[str, str] = {}  # content hash -> name of the image kept with it
        self._hashes = np.zeros(1024, dtype=np.uint64)  # pHashes of kept images, in order
        self._names: list[str] = []

    def find(self, digest: str, value: int) -> tuple[str, str] | None:
        """(kind, reason) if an image with this content hash and pHash is a duplicate."""
        if digest in self._first:
            return "exact duplicate", f"exact duplicate of {self._first[digest]}"
        if self.max_bits is None or not self._names:
            return None
        diff = self._hashes[: len(self._names)] ^ np.uint64(value)  # (N,)
        distances = _popcount(diff)  # (N,)
        best = int(np.argmin(distances))  # the earliest kept among equally close ones
        distance, match = int(distances[best]), self._names[best]
        if distance <= self.max_bits:
            return "near duplicate", f"near duplicate of {match} (hamming {distance})"
        return None

    def add(self, digest: str, value: int, name: str) -> None:
        """Record a kept image."""
        self._first.setdefault(digest, name)
        if len(self._names) == len(self._hashes):
            self._hashes = np.concatenate([self._hashes, np.zeros_like(self._hashes)])
        self._hashes[len(self._names)] = value
        self._names.append(name)
