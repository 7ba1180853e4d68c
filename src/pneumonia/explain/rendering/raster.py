"""Attribution figures drawn straight into pixels: the per-epoch callback's grid and explain.py's
per-image figure.

Matplotlib needs about 1.5 s for a grid of 8 images, which is more than a whole epoch on a GPU, and
about 1 s for one study figure, which made explaining a whole test split take minutes; these arrays
take milliseconds. The colours and scaling follow Captum's ``visualize_image_attr``: values of the
sign shown are divided by the level that keeps 98% of their absolute mass (``outlier_perc=2``) and
clipped, then mapped red (against) - white - green (for) for ``all`` on [-1, 1], and on [0, 1] by
matplotlib's Greens (``positive``), Reds (the magnitude of ``negative``) and Blues
(``absolute_value``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.colors import LinearSegmentedColormap
from PIL import Image, ImageDraw

from pneumonia.explain.settings import SIGNS

RED_WHITE_GREEN = LinearSegmentedColormap.from_list("RdWhGn", ["red", "white", "green"])
SIGN_COLOURS = {
    "all": RED_WHITE_GREEN,
    "positive": colormaps["Greens"],
    "negative": colormaps["Reds"],
    "absolute_value": colormaps["Blues"],
}
MIN_TILE = 128
MIN_FIGURE_TILE = 256  # explain.py's per-image figure: big enough to read a 128 px map
CAPTION_HEIGHT = 28
TITLE_HEIGHT = 18
LABEL_HEIGHT = 14
NOTE_COLOUR = (255, 255, 0)


def signed_part(attribution: np.ndarray, sign: str) -> np.ndarray:
    """The part of ``attribution`` that panel ``sign`` shows, as Captum takes it: the map itself for
    ``all``, ``max(a, 0)`` for ``positive``, ``max(-a, 0)`` for ``negative``, ``|a|`` for
    ``absolute_value``."""
    parts = {
        "all": lambda a: a,
        "positive": lambda a: np.maximum(a, 0),
        "negative": lambda a: np.maximum(-a, 0),
        "absolute_value": np.abs,
    }
    if sign not in parts:
        raise ValueError(f"sign must be one of {list(parts)}, got {sign!r}")
    return parts[sign](np.asarray(attribution, dtype=np.float64))


def normalize(attribution: np.ndarray, sign: str = "all", outlier_perc: float = 2.0) -> np.ndarray:
    """``(H, W)`` attribution scaled as Captum scales ``sign``: [-1, 1] for ``all``, [0, 1] for the
    others; a map with nothing of that sign stays zero (Captum refuses it)."""
    # NaN or infinite values (a broken model; explain.py refuses them) are drawn as no attribution
    # rather than turning the whole panel black.
    values = signed_part(np.nan_to_num(attribution, nan=0.0, posinf=0.0, neginf=0.0), sign)
    magnitudes = np.sort(np.abs(values).ravel())
    cumulative = np.cumsum(magnitudes)
    if cumulative.size == 0 or cumulative[-1] <= 0:
        return np.zeros(values.shape, dtype=np.float32)
    level = magnitudes[np.searchsorted(cumulative, cumulative[-1] * (1 - outlier_perc / 100))]
    return np.clip(values / level, -1, 1).astype(np.float32)


def heat_map(attribution: np.ndarray, sign: str = "all") -> np.ndarray:
    """``(H, W)`` attribution -> ``(H, W, 3)`` RGB in [0, 1], in the colours of ``sign``."""
    return _coloured(normalize(attribution, sign), sign)


def _coloured(scaled: np.ndarray, sign: str) -> np.ndarray:
    """:func:`normalize`'s output for ``sign`` in that sign's colours, ``(H, W, 3)``."""
    return SIGN_COLOURS[sign]((scaled + 1) / 2 if sign == "all" else scaled)[..., :3]


def blend(image: np.ndarray, heat: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Heat map ``(H, W, 3)`` over a grayscale ``image`` ``(H, W)`` in [0, 1]."""
    return (1 - alpha) * image[..., None] + alpha * heat


def attribution_grid_image(
    images: np.ndarray, attributions: np.ndarray, captions: Sequence[str], title: str
) -> np.ndarray:
    """Columns are images ``(N, H, W)`` in [0, 1]; rows: X-ray, signed map, overlay.

    Returns:
        ``(height, width, 3)`` uint8 RGB, with a title bar and a two-line caption per column.
    """
    count, height, width = images.shape
    scale = max(1, -(-MIN_TILE // max(height, width)))  # upscale small images so captions fit
    tile_h, tile_w = height * scale, width * scale
    canvas = np.ones(
        (TITLE_HEIGHT + CAPTION_HEIGHT + 3 * tile_h, count * tile_w, 3), dtype=np.float32
    )
    for i in range(count):
        heat = heat_map(attributions[i], "all")
        rows = (np.repeat(images[i][..., None], 3, axis=-1), heat, blend(images[i], heat))
        for r, tile in enumerate(rows):
            big = tile.repeat(scale, axis=0).repeat(scale, axis=1)
            top = TITLE_HEIGHT + CAPTION_HEIGHT + r * tile_h
            canvas[top : top + tile_h, i * tile_w : (i + 1) * tile_w] = big
    picture = Image.fromarray((np.clip(canvas, 0, 1) * 255).round().astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    draw.text((4, 3), title, fill=(0, 0, 0))
    for i, caption in enumerate(captions):
        draw.text((i * tile_w + 4, TITLE_HEIGHT + 1), caption, fill=(0, 0, 0), spacing=2)
    return np.asarray(picture)


def study_figure_image(
    image: np.ndarray, attribution: np.ndarray, title: str, signs: Sequence[str] = SIGNS
) -> np.ndarray:
    """The study's Figure 3 for one image: the X-ray, then the map of each sign alone (top row) and
    blended over the X-ray (bottom row), each panel labelled.

    ``image`` (in [0, 1]) and ``attribution`` are ``(H, W)``. A panel whose sign has no
    attribution shows the X-ray with a note (``all-zero map``, ``no positive attribution``).

    Returns:
        ``(height, width, 3)`` uint8 RGB with a title bar.
    """
    height, width = image.shape
    scale = max(1, -(-MIN_FIGURE_TILE // max(height, width)))
    tile_h, tile_w = height * scale, width * scale
    row_h = LABEL_HEIGHT + tile_h
    canvas = np.ones((TITLE_HEIGHT + 2 * row_h, (len(signs) + 1) * tile_w, 3), dtype=np.float32)
    xray = np.repeat(image[..., None], 3, axis=-1)
    labels: list[tuple[int, int, str]] = [(0, 0, "X-ray")]
    notes: list[tuple[int, int, str]] = []

    def place(row: int, column: int, tile: np.ndarray) -> None:
        top = TITLE_HEIGHT + row * row_h + LABEL_HEIGHT
        big = tile.repeat(scale, axis=0).repeat(scale, axis=1)
        canvas[top : top + tile_h, column * tile_w : (column + 1) * tile_w] = big

    place(0, 0, xray)
    for column, sign in enumerate(signs, start=1):
        name = sign.replace("_", " ")
        labels += [(0, column, name), (1, column, f"{name}, blended")]
        scaled = normalize(attribution, sign)  # zero where the sign has no (finite) attribution
        if scaled.any():
            heat = _coloured(scaled, sign)
            place(0, column, heat)
            place(1, column, blend(image, heat))
        else:
            note = "all-zero map" if sign in ("all", "absolute_value") else f"no {name} attribution"
            for row in (0, 1):
                place(row, column, xray)
                notes.append((row, column, note))
    picture = Image.fromarray((np.clip(canvas, 0, 1) * 255).round().astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    draw.text((4, 3), title, fill=(0, 0, 0))
    for row, column, text in labels:
        draw.text((column * tile_w + 4, TITLE_HEIGHT + row * row_h + 1), text, fill=(0, 0, 0))
    for row, column, text in notes:  # centred, on a dark box: readable over any X-ray
        left, top, right, bottom = draw.textbbox((0, 0), text)
        x = column * tile_w + (tile_w - (right - left)) // 2
        y = TITLE_HEIGHT + row * row_h + LABEL_HEIGHT + (tile_h - (bottom - top)) // 2
        draw.rectangle((x - 3, y - 2, x + right - left + 3, y + bottom - top + 3), fill=(0, 0, 0))
        draw.text((x - left, y - top), text, fill=NOTE_COLOUR)
    return np.asarray(picture)
