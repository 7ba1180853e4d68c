"""A BatchNorm + global-average-pooling CNN: the study's blocks, made robust to size and intensity.

Each block is Conv -> BatchNorm -> ReLU -> MaxPool; global average pooling replaces the study's
flatten, so any input size from 32 px works and the head has few weights. In external checks
(issue 7) networks of this kind generalised better outside the training pool than the study CNN.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from pneumonia.model.dropout import ByteMaskDropout
from pneumonia.model.registry import register_network


@register_network
class BatchNormCNN(nn.Module):
    """Binary classifier returning one logit per image.

    Args:
        in_channels: 1 for grayscale X-rays.
        channels: output channels of the convolution blocks (each halves the size).
        dropout: dropout before the linear head.

    Shapes:
        input ``(B, in_channels, H, W)`` float, ``H, W >= 2 ** len(channels)`` -> ``(B,)`` logits.
    """

    def __init__(
        self,
        in_channels: int = 1,
        channels: Sequence[int] = (32, 64, 128, 256),
        dropout: float = 0.3,
    ) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        previous = in_channels
        for width in channels:
            blocks += [
                nn.Conv2d(previous, width, 3, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            previous = width
        self.features = nn.Sequential(*blocks)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), ByteMaskDropout(dropout), nn.Linear(previous, 1)
        )

    @property
    def gradcam_layer(self) -> nn.Module:
        """The last block's activation (before pooling): Grad-CAM's default target layer."""
        return self.features[-2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x)).squeeze(-1)
