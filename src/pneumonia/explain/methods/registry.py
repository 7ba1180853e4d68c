"""The attribution methods by name, behind one signature, and how a batch is explained.

Every method here is an ``AttributionFn``: ``(class_model, images, targets) -> attributions`` with
images ``(B, 1, H, W)`` float in [0, 1], targets ``(B,)`` class indices and attributions
``(B, 1, H, W)``. ``class_model`` is :class:`~pneumonia.explain.methods.common.ClassScores`: the
classifier's one logit turned into the scores ``[-logit, logit]`` ``(B, 2)`` of (NORMAL, PNEUMONIA).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from pneumonia import CLASS_NAMES
from pneumonia.explain.methods.common import (
    attribution_mode,
    decision_threshold,
    pneumonia_probabilities,
)
from pneumonia.explain.methods.gradcam import gradcam
from pneumonia.explain.methods.guided_backprop import guided_backprop
from pneumonia.explain.methods.guided_gradcam import guided_gradcam
from pneumonia.explain.methods.saliency import saliency
from pneumonia.explain.settings import METHODS, check_target

AttributionFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
"""``(class_model, images (B, 1, H, W), targets (B,)) -> attributions (B, 1, H, W)``."""

Implementation = Callable[..., torch.Tensor]
"""``(class_model, images, targets, layer=, interpolate_mode=) -> attributions``, one per method."""

IMPLEMENTATIONS: dict[str, Implementation] = {
    "guided_gradcam": guided_gradcam,
    "gradcam": gradcam,
    "guided_backprop": guided_backprop,
    "saliency": saliency,
}
assert tuple(IMPLEMENTATIONS) == METHODS, "settings.METHODS and the implementations disagree"


def resolve_targets(
    target: str | int, probabilities: torch.Tensor, threshold: float
) -> torch.Tensor:
    """Class index per image ``(B,)``: ``"predicted"``, the class the classifier decides (PNEUMONIA
    where P(PNEUMONIA) ``probabilities (B,)`` is at or above its stored ``threshold``, not where
    the uncalibrated score passes 0.5), a class name, or an index.

    Raises:
        pneumonia.errors.ConfigError: any other ``target`` (:func:`~pneumonia.explain.settings.check_target`).
    """
    check_target(target)
    if isinstance(target, str) and target.lower() == "predicted":
        return (probabilities >= threshold).long()
    is_index = not isinstance(target, str) or target in {"0", "1"}
    index = int(target) if is_index else CLASS_NAMES.index(target.upper())
    return torch.full(
        (probabilities.shape[0],), index, dtype=torch.long, device=probabilities.device
    )


def attribution_fn(
    method: str, layer: str | None = None, interpolate_mode: str = "bilinear"
) -> AttributionFn:
    """The ``AttributionFn`` of ``method`` (one of ``METHODS``); ``layer`` is Grad-CAM's target layer.

    :meth:`pneumonia.explain.settings.AttributionSettings.attribution_fn` builds it from settings.
    """
    if method not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attribution method {method!r}; choose from {list(METHODS)}")
    implementation = IMPLEMENTATIONS[method]

    def attribute(model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with attribution_mode(model):
            # Clones are normal tensors even when the arguments were made in inference mode.
            inputs = images.detach().clone().float().requires_grad_(True)
            maps = implementation(
                model, inputs, targets.clone(), layer=layer, interpolate_mode=interpolate_mode
            )
        return maps.detach()

    attribute.__name__ = method
    return attribute


def class_scores(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Scores ``(B, 2)`` of a class model in eval mode (its mode is restored)."""
    with attribution_mode(model), torch.no_grad():
        return model(images.float())


def explain(
    model: nn.Module, images: torch.Tensor, method: AttributionFn, target: str | int = "predicted"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attributions of ``images (B, 1, H, W)`` in [0, 1] for ``target``.

    Returns:
        ``(maps (B, 1, H, W), probabilities (B,) of PNEUMONIA, targets (B,) explained class)``; the
        probabilities are the classifier's calibrated ones (see
        :func:`~pneumonia.explain.methods.common.pneumonia_probabilities`), and ``"predicted"``
        explains the class they are called at its stored threshold.
    """
    scores = class_scores(model, images)
    probabilities = pneumonia_probabilities(model, scores)
    targets = resolve_targets(target, probabilities, decision_threshold(model))
    return method(model, images, targets), probabilities, targets
