"""Attribution figures drawn with Captum's ``visualize_image_attr``.

- :func:`attribution_grid`: a sheet across images (X-ray, signed attribution, overlay): ``explain.py``'s
  summary. The per-epoch callback draws the same layout without matplotlib, and explain.py its
  per-image figures (the study's Figure 3), in :mod:`.raster`: matplotlib took a second each.

Captum refuses to draw an all-zero map ("Cannot normalize by scale factor = 0"); such panels are
drawn as the X-ray with a note instead of failing the whole figure.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
from captum.attr import visualization
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from pneumonia import CLASS_NAMES


def draw_attribution(
    fig: Figure,
    ax: Axes,
    attribution: np.ndarray,
    image: np.ndarray,
    method: str,
    sign: str,
    title: str,
) -> None:
    """One panel: ``attribution`` and ``image`` are ``(H, W)``, the image in [0, 1]."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="Attempting to normalize by value approximately 0"
        )
        try:
            visualization.visualize_image_attr(
                attribution[..., None],
                image[..., None],
                method=method,
                sign=sign,
                plt_fig_axis=(fig, ax),
                use_pyplot=False,
                title=title,
            )
            return
        except AssertionError as err:  # Captum asserts on an all-zero map of that sign
            if "scale factor = 0" not in str(err):
                raise
    ax.imshow(image, cmap="gray", vmin=0, vmax=1)
    note = "all-zero map" if sign in ("all", "absolute_value") else f"no {sign}\nattribution"
    ax.text(0.5, 0.5, note, color="yellow", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(title)
    ax.axis("off")


def describe(label: int | None, probability: float, threshold: float) -> str:
    """``true NORMAL, pred PNEUMONIA (p=0.93)``; p is the probability of PNEUMONIA, called
    PNEUMONIA at or above ``threshold`` (the classifier's stored one)."""
    called = probability >= threshold
    predicted = CLASS_NAMES[int(called)]
    truth = f"true {CLASS_NAMES[label]}, " if label is not None and label >= 0 else ""
    # Two decimals unless they would put p on the other side of the threshold (0.4995 -> 0.50).
    digits = 2
    while digits < 17 and (round(probability, digits) >= threshold) != called:
        digits += 1
    return f"{truth}pred {predicted} (p={probability:.{digits}f})"


def attribution_grid(
    images: np.ndarray,
    attributions: np.ndarray,
    labels: Sequence[int | None],
    probabilities: Sequence[float],
    title: str,
    threshold: float,
) -> Figure:
    """Columns are images ``(N, H, W)``; rows: the X-ray, the signed attribution, the overlay.
    Each column is titled with its true class and the decision at ``threshold``."""
    count = len(images)
    fig, axes = plt.subplots(3, count, figsize=(2.2 * count, 7.0), squeeze=False)
    for i in range(count):
        axes[0, i].imshow(images[i], cmap="gray", vmin=0, vmax=1)
        axes[0, i].set_title(
            describe(labels[i], float(probabilities[i]), threshold).replace(", pred", "\npred"),
            fontsize=8,
        )
        axes[0, i].axis("off")
        draw_attribution(fig, axes[1, i], attributions[i], images[i], "heat_map", "all", "signed")
        draw_attribution(
            fig, axes[2, i], attributions[i], images[i], "blended_heat_map", "all", "overlay"
        )
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def close(fig: Figure) -> None:
    plt.close(fig)
