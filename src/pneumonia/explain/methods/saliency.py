"""Saliency (Simonyan et al. 2014): the signed input gradient of the explained class score."""

from __future__ import annotations

import torch
from captum.attr import Saliency
from torch import nn


def saliency(
    model: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    layer: str | None,
    interpolate_mode: str,
) -> torch.Tensor:
    """Gradient of the score of ``targets (B,)`` with respect to ``images (B, 1, H, W)``.

    Returns ``(B, 1, H, W)``, signed (Captum's ``abs=False``); ``layer`` and ``interpolate_mode``
    are unused.
    """
    return Saliency(model).attribute(images, target=targets, abs=False)
