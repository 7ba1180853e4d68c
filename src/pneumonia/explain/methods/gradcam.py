"""Grad-CAM (Selvaraju et al. 2017), upsampled to the input."""

from __future__ import annotations

import torch
from captum.attr import LayerAttribution, LayerGradCam
from torch import nn

from pneumonia.explain.methods.common import find_layer


def gradcam(
    model: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    layer: str | None,
    interpolate_mode: str,
) -> torch.Tensor:
    """ReLU'd Grad-CAM of ``layer`` for ``targets (B,)``, upsampled to ``images (B, 1, H, W)``.

    Returns ``(B, 1, H, W)``, non-negative. ``model`` returns class scores ``(B, 2)``;
    ``layer`` is a module path for :func:`find_layer`.
    """
    cam = LayerGradCam(model, find_layer(model, layer)).attribute(
        images, target=targets, relu_attributions=True
    )
    return LayerAttribution.interpolate(cam, tuple(images.shape[-2:]), interpolate_mode)
