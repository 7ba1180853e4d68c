"""Attribution methods: one per module, as in Captum's ``attr/``, behind one signature.

- :mod:`.guided_gradcam`: Guided Grad-CAM (the study's method), :mod:`.gradcam`: Grad-CAM,
  :mod:`.guided_backprop`: guided backpropagation, :mod:`.saliency`: the input gradient. Each
  exposes ``method(class_model, images (B, 1, H, W), targets (B,), layer, interpolate_mode)``
  -> ``(B, 1, H, W)``; guided backpropagation (and so Guided Grad-CAM) also guides LeakyReLU.
- :mod:`.common`: the two-class wrapper :class:`ClassScores`, Grad-CAM's layer choice
  :func:`find_layer`, the calibrated probability and decision threshold of the classifier, and the
  attribution mode (eval, gradients on, no in-place activations).
- :mod:`.registry`: the methods by name (:func:`attribution_fn`) and :func:`explain` of a batch.

What to compute (method, target, layer, upsampling) is
:class:`pneumonia.explain.settings.AttributionSettings`.
"""

from __future__ import annotations

from pneumonia.explain.methods.common import (
    ClassScores,
    attribution_mode,
    decision_threshold,
    eval_mode,
    find_layer,
    pneumonia_probabilities,
    unwrap,
)
from pneumonia.explain.methods.guided_backprop import LeakyGuidedBackprop
from pneumonia.explain.methods.guided_gradcam import LeakyGuidedGradCam
from pneumonia.explain.methods.registry import (
    METHODS,
    AttributionFn,
    attribution_fn,
    class_scores,
    explain,
    resolve_targets,
)

__all__ = [
    "METHODS",
    "AttributionFn",
    "ClassScores",
    "LeakyGuidedBackprop",
    "LeakyGuidedGradCam",
    "attribution_fn",
    "attribution_mode",
    "class_scores",
    "decision_threshold",
    "eval_mode",
    "explain",
    "find_layer",
    "pneumonia_probabilities",
    "resolve_targets",
    "unwrap",
]
