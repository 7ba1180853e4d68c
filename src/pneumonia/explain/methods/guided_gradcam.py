"""Guided Grad-CAM with guided backpropagation that also guides LeakyReLU."""

from __future__ import annotations

import torch
from captum.attr import GuidedGradCam
from torch import nn

from pneumonia.explain.methods.common import find_layer
from pneumonia.explain.methods.guided_backprop import LeakyGuidedBackprop


class LeakyGuidedGradCam(GuidedGradCam):
    """Captum's ``GuidedGradCam`` whose guided-backpropagation half guides LeakyReLU too.

    ``attribute(inputs (B, C, H, W), target, interpolate_mode=...)`` returns ``(B, C, H, W)``: the
    layer's ReLU'd Grad-CAM, upsampled to the input, times the guided gradient. The Grad-CAM paper
    upsamples bilinearly; Captum's default is ``"nearest"``, so pass the mode explicitly.
    """

    def __init__(self, model: nn.Module, layer: nn.Module) -> None:
        super().__init__(model, layer)
        self.guided_backprop = LeakyGuidedBackprop(model)


def guided_gradcam(
    model: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    layer: str | None,
    interpolate_mode: str,
) -> torch.Tensor:
    """Guided Grad-CAM of ``layer`` for ``targets (B,)`` on ``images (B, 1, H, W)``.

    Returns ``(B, 1, H, W)``: the ReLU'd Grad-CAM upsampled with ``interpolate_mode``, times the
    guided gradient. ``layer`` is a module path for :func:`find_layer`.
    """
    explainer = LeakyGuidedGradCam(model, find_layer(model, layer))
    return explainer.attribute(images, target=targets, interpolate_mode=interpolate_mode)
