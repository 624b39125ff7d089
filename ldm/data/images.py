"""Opening images of any common mode as upright RGB, and telling image files apart."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

# What PIL decodes and people keep training images in; matched case-insensitively.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
BACKGROUND = (255, 255, 255)  # transparent pixels are composited onto white


def is_image_file(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def to_rgb(image: Image.Image) -> Image.Image:
    """Upright (EXIF orientation applied) 8-bit RGB: greyscale is repeated, palettes are
    expanded, and transparency is composited onto white rather than dropped to black."""
    image = ImageOps.exif_transpose(image)
    if image.mode == "P":
        image = image.convert("RGBA")  # a palette's transparency becomes an alpha channel
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode.startswith("I") or image.mode == "F":
        # 16-bit greyscale: 65535 -> 255. 32-bit or float: its own range stretched to 8
        # bits (their scale is not standard). Either way, no clipping at 255.
        values = np.asarray(image, dtype=np.float64)
        if image.mode.startswith("I;16"):
            scaled = values / 257.0
        else:
            low, high = float(values.min()), float(values.max())
            scaled = (values - low) * (255.0 / (high - low)) if high > low else values * 0
        image = Image.fromarray(scaled.round().astype(np.uint8), mode="L")
    return image.convert("RGB")


def open_image(source: str | Path | bytes) -> Image.Image:
    """Decode a file path or encoded bytes fully into upright RGB.

    Raises ``ValueError`` naming the source for anything PIL cannot decode completely
    (a truncated file raises too: PIL's lazy open alone would not notice).
    """
    name = "<bytes>" if isinstance(source, bytes) else str(source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            handle = io.BytesIO(source) if isinstance(source, bytes) else source
            with Image.open(handle) as image:
                image.load()
                return to_rgb(image)
    except FileNotFoundError:
        raise
    except Exception as err:  # PIL raises many types for bad data
        raise ValueError(f"cannot decode image {name}: {type(err).__name__}: {err}") from None
