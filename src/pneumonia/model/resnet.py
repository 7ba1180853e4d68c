"""torchvision's ResNet-18 with a one-channel stem, trained from random initialisation.

No pretrained weights: nothing may be downloaded at run time, and ImageNet's three colour channels
do not fit grayscale X-rays anyway. The activations are ``nn.ReLU`` modules, so guided
backpropagation guides them; Grad-CAM looks at the last residual stage.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models import resnet18

from pneumonia.model.registry import register_network


@register_network
class ResNet18(nn.Module):
    """ResNet-18 returning one logit per image.

    Args:
        in_channels: 1 for grayscale X-rays.

    Shapes:
        input ``(B, in_channels, H, W)`` float, ``H, W >= 32`` -> ``(B,)`` logits.
    """

    def __init__(self, in_channels: int = 1) -> None:
        super().__init__()
        self.body = resnet18(weights=None, num_classes=1)
        self.body.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)

    @property
    def gradcam_layer(self) -> nn.Module:
        """The last residual stage (7x7 at 224 px): Grad-CAM's default target layer."""
        return self.body.layer4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).squeeze(-1)
