"""DenseNet-121, the CheXNet architecture, with a one-channel stem and random initialisation.

torchvision's ``DenseNet.forward`` applies its last ReLU as a function, which guided
backpropagation cannot see; this wrapper runs the same layers with an ``nn.ReLU`` module instead,
so every activation is guided. Grad-CAM looks at the output of the last dense block's norm.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models import densenet121

from pneumonia.model.registry import register_network


@register_network
class DenseNet121(nn.Module):
    """DenseNet-121 returning one logit per image.

    Args:
        in_channels: 1 for grayscale X-rays.
        dropout: dropout inside the dense layers (torchvision's ``drop_rate``).

    Shapes:
        input ``(B, in_channels, H, W)`` float, ``H, W >= 32`` -> ``(B,)`` logits.
    """

    def __init__(self, in_channels: int = 1, dropout: float = 0.0) -> None:
        super().__init__()
        body = densenet121(weights=None, num_classes=1, drop_rate=dropout)
        body.features.conv0 = nn.Conv2d(
            in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False
        )
        self.features = body.features
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = body.classifier

    @property
    def gradcam_layer(self) -> nn.Module:
        """The final BatchNorm of the features: Grad-CAM's default target layer."""
        return self.features.norm5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.pool(self.relu(self.features(x))).flatten(1)
        return self.classifier(out).squeeze(-1)
