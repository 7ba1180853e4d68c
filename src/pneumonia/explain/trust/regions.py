"""Where attribution mass falls: central band, lung fields, border, per class and sign.

The study read its saliency maps as "the model decides on the area around the heart; negative
evidence sits on the rib cage". This module puts numbers on such a reading: the share of positive
and of negative attribution mass in three coarse regions of a frontal chest X-ray, averaged per
true class and class explained, next to each region's share of the image area (what a map spread
evenly would give).

The regions are fixed rectangles in fractions of the frame, an approximation for square-resized
frontal (PA/AP) radiographs: no segmentation, so a rotated or off-centre patient shifts them.
A pixel belongs to a band when its centre, as a fraction of the side, lies inside the band (ends
included).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from pneumonia import CLASS_NAMES

REGION_NAMES: tuple[str, ...] = ("central", "lungs", "border")
"""Disjoint regions that together cover the image."""

SIGNS: tuple[str, ...] = ("positive", "negative")

CENTRAL_COLUMNS: tuple[float, float] = (0.35, 0.65)
"""Heart and mediastinum: a central vertical band, as a fraction of the width..."""
CENTRAL_ROWS: tuple[float, float] = (0.20, 0.95)
"""...from below the clavicles down to the diaphragm, as a fraction of the height."""

LUNG_COLUMNS: tuple[tuple[float, float], ...] = ((0.10, 0.35), (0.65, 0.90))
"""The two lateral lung fields, as fractions of the width (the central band is excluded)."""
LUNG_ROWS: tuple[float, float] = (0.10, 0.90)
"""Apices to costophrenic angles, as a fraction of the height."""


def _band(size: int, band: tuple[float, float]) -> torch.Tensor:
    """``(size,)`` mask of the pixels whose centre lies in ``band`` (fractions of ``size``)."""
    centres = (torch.arange(size, dtype=torch.float64) + 0.5) / size
    return (centres >= band[0]) & (centres <= band[1])


def region_masks(height: int, width: int) -> dict[str, torch.Tensor]:
    """Masks of the regions of ``REGION_NAMES``; disjoint, and together they cover the image.

    Returns:
        ``{"central", "lungs", "border"}`` -> ``(height, width)`` bool masks.
    """
    if height < 1 or width < 1:
        raise ValueError(f"the image must have at least one pixel, got {height}x{width}")
    central = _band(height, CENTRAL_ROWS)[:, None] & _band(width, CENTRAL_COLUMNS)[None, :]
    lung_columns = torch.zeros(width, dtype=torch.bool)
    for band in LUNG_COLUMNS:
        lung_columns |= _band(width, band)
    lungs = _band(height, LUNG_ROWS)[:, None] & lung_columns[None, :] & ~central
    border = ~(central | lungs)
    return {"central": central, "lungs": lungs, "border": border}


def region_area_shares(height: int, width: int) -> dict[str, float]:
    """Share of the image area in each region: the share a uniformly spread map would give."""
    return {name: float(mask.double().mean()) for name, mask in region_masks(height, width).items()}


def region_shares(attributions: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
    """Share of positive and of negative attribution mass in each region, per image.

    Positive mass is the sum of ``max(a, 0)``, negative mass the sum of ``max(-a, 0)``; for each
    sign the shares of the regions sum to 1. An image with no mass of a sign gets NaN shares for
    that sign (there is nothing to locate), which :func:`summarize_by_class` skips.

    Args:
        attributions: ``(B, 1, H, W)`` or ``(B, H, W)`` signed attributions; several channels are
            summed per pixel.

    Returns:
        ``{"positive", "negative"}`` -> ``{"central", "lungs", "border"}`` -> ``(B,)`` float64 shares.
    """
    if attributions.dim() == 4:
        attributions = attributions.sum(dim=1)
    if attributions.dim() != 3:
        raise ValueError(
            f"attributions must be (B, 1, H, W) or (B, H, W), got {tuple(attributions.shape)}"
        )
    values = attributions.detach().double()
    masks = region_masks(*values.shape[-2:])
    result: dict[str, dict[str, torch.Tensor]] = {}
    for sign, mass in (("positive", values.clamp(min=0)), ("negative", (-values).clamp(min=0))):
        total = mass.sum(dim=(1, 2))
        # Dividing by a zero total yields NaN for an image with no mass of this sign: intended.
        result[sign] = {
            name: (mass * mask.to(mass.device)).sum(dim=(1, 2)) / total
            for name, mask in masks.items()
        }
    return result


def summarize_by_class(
    shares: Mapping[str, Mapping[str, torch.Tensor]],
    labels: torch.Tensor,
    explained: torch.Tensor,
    class_names: Sequence[str] = CLASS_NAMES,
) -> list[dict]:
    """Mean region shares per true class, explained class and sign, ignoring images without mass
    of that sign.

    A map's positive mass is evidence for the class it explains: with ``target=predicted`` the
    NORMAL X-rays called PNEUMONIA are explained for PNEUMONIA, and averaging their maps with
    those explained for NORMAL would mix evidence for and against. So they get rows of their own.

    Args:
        shares: the output of :func:`region_shares` for ``B`` images.
        labels: ``(B,)`` true class index of each image, indexing ``class_names``.
        explained: ``(B,)`` index of the class each image's map explains.
        class_names: name of each class index.

    Returns:
        Two rows (positive, negative) per pair of true and explained class that has images, true
        classes first: ``{"class": str, "explained": str, "sign": str, "images": int,
        "central": float, "lungs": float, "border": float}``, where ``images`` counts the images
        that had mass of that sign (NaN shares where none had).
    """
    labels = labels.detach().long().cpu()
    explained = explained.detach().long().cpu()
    if labels.shape != explained.shape:
        raise ValueError(
            f"one explained class per image: labels {tuple(labels.shape)}, "
            f"explained {tuple(explained.shape)}"
        )
    rows: list[dict] = []
    for true_index, class_name in enumerate(class_names):
        for explained_index, explained_name in enumerate(class_names):
            group = (labels == true_index) & (explained == explained_index)
            if not group.any():
                continue
            for sign in SIGNS:
                values = {name: shares[sign][name].detach().cpu()[group] for name in REGION_NAMES}
                row: dict = {
                    "class": class_name,
                    "explained": explained_name,
                    "sign": sign,
                    "images": int((~torch.isnan(values["central"])).sum()),
                }
                row.update({name: float(torch.nanmean(v)) for name, v in values.items()})
                rows.append(row)
    return rows


def _percent(value: float, width: int) -> str:
    return f"{'n/a':>{width}}" if math.isnan(value) else f"{value:>{width}.1%}"


def format_region_table(rows: Sequence[Mapping], area_shares: Mapping[str, float]) -> str:
    """Fixed-width text table of :func:`summarize_by_class` rows, ending with the area (chance) row.

    Returns:
        One line per row, a header first, e.g.::

            class      explained  sign       central   lungs  border  images
            NORMAL     NORMAL     positive     41.2%   30.1%   28.7%      12
            ...
            area                  (chance)     21.9%   35.2%   42.9%
    """
    names = [str(row[key]) for row in rows for key in ("class", "explained")]
    name_width = max([len("explained"), *(len(name) for name in names)])
    sign_width = max(len("positive"), len("negative"), len("(chance)"))
    column = 8

    def line(true: str, explained: str, sign: str, cells: str) -> str:
        return f"{true:<{name_width}}  {explained:<{name_width}}  {sign:<{sign_width}}" + cells

    lines = [
        line(
            "class",
            "explained",
            "sign",
            "".join(f"{name:>{column}}" for name in REGION_NAMES) + f"{'images':>{column}}",
        )
    ]
    for row in rows:
        cells = "".join(_percent(float(row[name]), column) for name in REGION_NAMES)
        lines.append(
            line(str(row["class"]), str(row["explained"]), row["sign"], cells)
            + f"{row.get('images', ''):>{column}}"
        )
    chance = "".join(_percent(float(area_shares[name]), column) for name in REGION_NAMES)
    lines.append(line("area", "", "(chance)", chance))
    return "\n".join(lines)
