"""Guided Grad-CAM with guided backpropagation that also guides LeakyReLU, in one forward pass.

Captum's ``GuidedGradCam`` runs the model twice: a forward and backward pass for Grad-CAM, then
another pair, with its guided hooks, for guided backpropagation. :func:`guided_gradcam` gets both
from one forward pass: the plain gradient at the layer first (the graph kept), then the guided
gradient at the input, with the guided rule switched on for that second backward pass only. The
result equals :class:`LeakyGuidedGradCam`'s (Captum's, with LeakyReLU guided; tested on every
registered network) at about 1.6x its speed on the CPU.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from captum.attr import GuidedGradCam, LayerAttribution
from torch import nn

from pneumonia.explain.methods.common import check_feature_map, find_layer, layer_not_called
from pneumonia.explain.methods.guided_backprop import GUIDED_ACTIVATIONS, LeakyGuidedBackprop


class LeakyGuidedGradCam(GuidedGradCam):
    """Captum's ``GuidedGradCam`` whose guided-backpropagation half guides LeakyReLU too.

    ``attribute(inputs (B, C, H, W), target, interpolate_mode=...)`` returns ``(B, C, H, W)``: the
    layer's ReLU'd Grad-CAM, upsampled to the input, times the guided gradient. The Grad-CAM paper
    upsamples bilinearly; Captum's default is ``"nearest"``, so pass the mode explicitly.
    The reference :func:`guided_gradcam` is checked against.
    """

    def __init__(self, model: nn.Module, layer: nn.Module) -> None:
        super().__init__(model, layer)
        self.guided_backprop = LeakyGuidedBackprop(model)


class _GuideSwitch:
    """Forward pre-hooks on every guided activation whose backward applies Captum's guided rule,
    ``relu(grad_input)``, only while :attr:`on` is True.

    Each call of an activation gets its own alias of its input, so the rule touches the gradient
    that flows through that activation alone (as Captum's module hooks do), also when the input
    has other consumers or a module is called twice (ResNet's blocks).
    """

    def __init__(self) -> None:
        self.on = False

    def _guide(self, grad: torch.Tensor) -> torch.Tensor | None:
        return grad.clamp_min(0) if self.on else None

    def pre_hook(self, module: nn.Module, args: tuple) -> tuple | None:
        if not args or not isinstance(args[0], torch.Tensor) or not args[0].requires_grad:
            return None
        alias = args[0].view_as(args[0])
        alias.register_hook(self._guide)
        return (alias, *args[1:])


@contextmanager
def _hooked(model: nn.Module, layer: nn.Module) -> Iterator[tuple[_GuideSwitch, list]]:
    switch, captured = _GuideSwitch(), []

    def capture(module: nn.Module, args: tuple, output):
        # The rest of the network gets a clone, as in Captum: an in-place change further on
        # (ResNet's `out += identity` after bn2) must not alter the activation Grad-CAM weighs.
        if isinstance(output, torch.Tensor):
            captured.append(output)
            return output.clone()
        if isinstance(output, tuple | list) and output and isinstance(output[0], torch.Tensor):
            captured.append(output[0])
            return type(output)([output[0].clone(), *output[1:]])
        return None

    handles = [
        module.register_forward_pre_hook(switch.pre_hook)
        for module in model.modules()
        if isinstance(module, GUIDED_ACTIVATIONS)
    ]
    handles.append(layer.register_forward_hook(capture))
    try:
        yield switch, captured
    finally:
        for handle in handles:
            handle.remove()


def guided_gradcam(
    model: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    layer: str | None,
    interpolate_mode: str,
) -> torch.Tensor:
    """Guided Grad-CAM of ``layer`` for ``targets (B,)`` on ``images (B, 1, H, W)``.

    ``images`` must require gradients; ``model`` returns class scores ``(B, 2)`` (in eval mode,
    activations not in place: see :func:`~pneumonia.explain.methods.common.attribution_mode`).
    Returns ``(B, 1, H, W)``: the layer's ReLU'd Grad-CAM upsampled with ``interpolate_mode``,
    times the guided gradient. ``layer`` is a module path for :func:`find_layer`.
    """
    target_layer = find_layer(model, layer)
    with _hooked(model, target_layer) as (switch, captured):
        scores = model(images)
        if not captured:
            raise layer_not_called(layer)
        activation = captured[-1]
        check_feature_map(layer, activation)
        if not activation.requires_grad:
            raise ValueError(
                f"layer {layer!r} has no gradient (is it frozen or outside the network?); "
                "choose a layer the score depends on"
            )
        selected = scores.gather(1, targets.reshape(-1, 1).to(scores.device)).sum()
        (layer_grad,) = torch.autograd.grad(selected, activation, retain_graph=True)
        # Grad-CAM (Selvaraju et al.): channel weights are the spatial means of the gradient.
        weights = layer_grad.mean(dim=tuple(range(2, layer_grad.dim())), keepdim=True)
        cam = F.relu((weights * activation).sum(dim=1, keepdim=True)).detach()
        switch.on = True
        (guided,) = torch.autograd.grad(selected, images)
    # Upsampled as gradcam.py and Captum upsample it.
    cam = LayerAttribution.interpolate(cam, tuple(images.shape[2:]), interpolate_mode)
    return guided * cam
