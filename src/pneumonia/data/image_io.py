"""Decoding one X-ray into the square 8-bit grayscale array every model here consumes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

# Modes whose values do not fit 0..255 and must be rescaled rather than clipped by convert("L").
_WIDE_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N", "F"})


def load_grayscale(path: str | Path, image_size: int) -> np.ndarray:
    """Decode ``path`` (JPEG or PNG, grayscale, RGB or 16-bit, any size) to ``(image_size, image_size)`` uint8.

    The image is squashed to a square without keeping its aspect ratio, as the study (and most
    pipelines for this dataset) did, with an antialiased bilinear filter.

    Raises:
        OSError: the file is unreadable or not an image (PIL's ``UnidentifiedImageError`` included).
    """
    with Image.open(path) as img:
        # JPEG's DCT scaling decodes big originals at 1/2..1/8 size straight away: much faster.
        img.draft("L", (image_size, image_size))
        if img.mode in _WIDE_MODES:
            values = np.asarray(img, dtype=np.float32)
            low, high = float(values.min()), float(values.max())
            scaled = (values - low) * (255.0 / (high - low)) if high > low else values * 0
            img = Image.fromarray(scaled.round().astype(np.uint8))
        elif img.mode != "L":
            img = img.convert("L")
        img = img.resize((image_size, image_size), Image.Resampling.BILINEAR)
        return np.asarray(img, dtype=np.uint8)
