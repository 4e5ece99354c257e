"""Reading image files to 8-bit RGB arrays and resizing them, with Pillow.

Conversions (documented contract, tested):
- grayscale ('L', '1'), palette ('P'), 'LA', 'RGBA', 'CMYK', 'YCbCr' -> RGB via
  Pillow's ``convert('RGB')`` (alpha is dropped, as Keras's ``load_img`` does);
- 16-bit integer grayscale ('I;16*', and 'I' read as 16-bit) -> scaled to 8
  bits (``round(v * 255 / 65535)``), not clipped, then replicated to RGB
  (32-bit values above 65535 saturate at 255);
- every frame but the first of a multi-frame file is ignored.
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from imgclf_jax.errors import DataError

RESIZE_FILTERS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}


# Raster formats people store datasets in; other files in an image folder are ignored.
COMMON_EXTENSIONS = frozenset({
    ".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".webp", ".bmp", ".dib", ".gif", ".tif", ".tiff",
    ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".ico", ".jp2", ".j2k", ".avif", ".heic", ".qoi",
})


def image_extensions() -> frozenset[str]:
    """Lower-case image file extensions ('.png', '.webp', ...) that Pillow can open here."""
    Image.init()
    readable = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}
    return frozenset(readable & COMMON_EXTENSIONS)


def _to_rgb(image: Image.Image) -> np.ndarray:
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        values = np.asarray(image).astype(np.float64)
        peak = 65535.0
        gray = np.clip(np.round(values * (255.0 / peak)), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=-1)
    if image.mode == "F":
        raise ValueError("floating-point images are not supported")
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def load_rgb(path: str | os.PathLike) -> np.ndarray:
    """Reads one image file as ``uint8[H, W, 3]``.

    Raises:
      DataError: the file is missing, truncated or not an image Pillow reads; the
        message names the file.
    """
    try:
        with Image.open(path) as image:
            image.load()
            return _to_rgb(image)
    except FileNotFoundError:
        raise DataError(f"image file '{path}' not found") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:  # corrupt or huge
        raise DataError(f"image file '{path}' cannot be read: {e}") from None


def resize(image: np.ndarray, size: int, method: str) -> np.ndarray:
    """Resizes ``uint8[H, W, 3]`` to ``uint8[size, size, 3]`` with a Pillow filter.

    'nearest' equals Keras's ``load_img(target_size=...)`` default. An image
    already of that size is returned unchanged.
    """
    if image.shape[0] == size and image.shape[1] == size:
        return image
    resized = Image.fromarray(image).resize((size, size), RESIZE_FILTERS[method])
    return np.asarray(resized, dtype=np.uint8)
