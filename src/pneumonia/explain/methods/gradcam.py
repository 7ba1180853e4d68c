"""Grad-CAM (Selvaraju et al. 2017), upsampled to the input."""

from __future__ import annotations

import torch
from captum.attr import LayerAttribution, LayerGradCam
from torch import nn

from pneumonia.explain.methods.common import check_feature_map, find_layer, layer_not_called


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
    target_layer = find_layer(model, layer)
    called = []

    def check(module: nn.Module, args: tuple, output: object) -> None:
        check_feature_map(layer, output)
        called.append(True)

    handle = target_layer.register_forward_hook(check)
    try:
        cam = LayerGradCam(model, target_layer).attribute(
            images, target=targets, relu_attributions=True
        )
    except AssertionError as err:  # Captum's when the layer never ran
        if called:
            raise
        raise layer_not_called(layer) from err
    finally:
        handle.remove()
    return LayerAttribution.interpolate(cam, tuple(images.shape[-2:]), interpolate_mode)
