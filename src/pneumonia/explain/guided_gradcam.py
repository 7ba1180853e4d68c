"""Guided Grad-CAM with guided backpropagation that also guides LeakyReLU."""

from __future__ import annotations

from captum.attr import GuidedGradCam
from torch import nn

from pneumonia.explain.guided_backprop import LeakyGuidedBackprop


class LeakyGuidedGradCam(GuidedGradCam):
    """Captum's ``GuidedGradCam`` whose guided-backpropagation half guides LeakyReLU too.

    ``attribute(inputs (B, C, H, W), target, interpolate_mode=...)`` returns ``(B, C, H, W)``: the
    layer's ReLU'd Grad-CAM, upsampled to the input, times the guided gradient. The Grad-CAM paper
    upsamples bilinearly; Captum's default is ``"nearest"``, so pass the mode explicitly.
    """

    def __init__(self, model: nn.Module, layer: nn.Module) -> None:
        super().__init__(model, layer)
        self.guided_backprop = LeakyGuidedBackprop(model)
