"""Guided backpropagation that also guides LeakyReLU.

Captum's ``GuidedBackprop`` overrides the backward pass of ``nn.ReLU`` modules only. The study's CNN
uses ``nn.LeakyReLU``, so Captum silently returns the plain gradient for it (and ``GuidedGradCam``
returns gradient x Grad-CAM). This class applies Captum's own guided rule, ``relu(grad_input)`` at
each activation (only positive gradient flows back), to ``nn.LeakyReLU`` as well. On a ReLU-only
model it is exactly Captum's ``GuidedBackprop``.
"""

from __future__ import annotations

import torch
from captum._utils.common import _register_backward_hook
from captum.attr import GuidedBackprop
from torch import nn

GUIDED_ACTIVATIONS: tuple[type[nn.Module], ...] = (nn.ReLU, nn.LeakyReLU)


class LeakyGuidedBackprop(GuidedBackprop):
    """Guided backpropagation over ``nn.ReLU`` and ``nn.LeakyReLU`` modules.

    Usage and shapes are Captum's: ``attribute(inputs (B, C, H, W), target)`` returns
    ``(B, C, H, W)``. Activations must be modules (not ``F.relu`` calls) and must not be in-place
    while attributing (see :func:`pneumonia.explain.methods.common.attribution_mode`).
    """

    def _register_hooks(self, module: nn.Module) -> None:
        if isinstance(module, GUIDED_ACTIVATIONS):
            self.backward_hooks.extend(_register_backward_hook(module, self._backward_hook, self))


def guided_backprop(
    model: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    layer: str | None,
    interpolate_mode: str,
) -> torch.Tensor:
    """Guided backpropagation of the score of ``targets (B,)`` to ``images (B, 1, H, W)``.

    Returns ``(B, 1, H, W)``, signed; ``layer`` and ``interpolate_mode`` are unused.
    """
    return LeakyGuidedBackprop(model).attribute(images, target=targets)
