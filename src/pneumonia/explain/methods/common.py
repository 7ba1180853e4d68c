"""What every attribution method shares: the two-class wrapper, the layer choice, attribution mode.

A classifier here returns one logit per image, ``(B,)``, for images ``(B, 1, H, W)`` in [0, 1].
:class:`ClassScores` turns it into the scores ``[-logit, logit]`` ``(B, 2)`` of (NORMAL, PNEUMONIA)
that Captum's ``target=`` indexes, so explaining NORMAL attributes the negated logit (a confident
NORMAL image otherwise gets an all-zero, ReLU'd Grad-CAM).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from pneumonia.model.modes import eval_mode

DEFAULT_THRESHOLD = 0.5
"""The decision threshold of a classifier that stores none (a bare ``nn.Module``)."""


class ClassScores(nn.Module):
    """Wraps a single-logit classifier: images ``(B, 1, H, W)`` in [0, 1] -> scores ``(B, 2)``.

    ``sigmoid(scores[:, c])`` is the uncalibrated probability of class ``c``; the displayed
    P(PNEUMONIA) is :func:`pneumonia_probabilities` (the classifier's calibrated one).
    """

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logit = self.classifier(images)
        return torch.stack([-logit, logit], dim=1)


def unwrap(model: nn.Module) -> nn.Module:
    """The classifier inside a :class:`ClassScores`, else ``model`` itself."""
    return model.classifier if isinstance(model, ClassScores) else model


def pneumonia_probabilities(model: nn.Module, scores: torch.Tensor) -> torch.Tensor:
    """P(PNEUMONIA) ``(B,)`` float64 of the scores ``(B, 2)`` that ``model`` (a :class:`ClassScores`)
    gave.

    The classifier's own calibrated probability (``XrayClassifier.probabilities_from_logits``:
    ``sigmoid(logit / temperature)``) when it has one, else ``sigmoid(logit)``. In float64, as
    ``predict_proba`` computes it: near the stored threshold (or near 1 at a small temperature)
    float32 rounding would decide otherwise than ``predict.py`` does.
    """
    logits = scores[:, 1].double()
    calibrated = getattr(unwrap(model), "probabilities_from_logits", None)
    return calibrated(logits) if callable(calibrated) else torch.sigmoid(logits)


def decision_threshold(model: nn.Module) -> float:
    """The classifier's stored decision threshold (``XrayClassifier.threshold``), else 0.5.

    P(PNEUMONIA) at or above it is called PNEUMONIA.
    """
    threshold = getattr(unwrap(model), "threshold", None)
    if isinstance(threshold, bool) or not isinstance(threshold, int | float):
        return DEFAULT_THRESHOLD
    return float(threshold)


def find_layer(model: nn.Module, name: str | None) -> nn.Module:
    """The module called ``name`` (dotted path, e.g. ``net.features.6``), else the network's own
    ``gradcam_layer`` if it names one (ResNet-18: its last stage), else the last ``Conv2d``.

    Names are relative to the classifier, also when ``model`` is its :class:`ClassScores` wrapper.
    On a classifier the layer must be inside its network ``net``: the augmentation does not run
    when explaining, and the metrics are not layers.

    Raises:
        ValueError: no such module, or one outside the network, naming the convolutions to use.
    """
    model = unwrap(model)
    network = getattr(model, "net", None)
    preferred = getattr(network, "gradcam_layer", None)
    if not name and isinstance(preferred, nn.Module):
        return preferred
    if name:
        # The convolutions' names are listed only when an error needs them.
        try:
            layer = model.get_submodule(name)
        except AttributeError as err:
            raise ValueError(
                f"layer {name!r} is not in the model; convolutions are {_convolution_names(model)}"
            ) from err
        if isinstance(network, nn.Module) and not any(m is layer for m in network.modules()):
            raise ValueError(
                f"layer {name!r} is not part of the network (net); Grad-CAM needs one of its "
                f"layers, e.g. a convolution: {_convolution_names(model)}"
            )
        return layer
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError(
            "the model has no Conv2d layer for Grad-CAM; name one with layer=<module path>"
        )
    return convs[-1]


def _convolution_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def layer_not_called(layer: str | None) -> ValueError:
    """The error for a Grad-CAM layer the forward pass never ran (its hooks saw nothing)."""
    return ValueError(f"layer {layer!r} was not called by the model's forward pass")


def check_feature_map(layer: str | None, output: object) -> None:
    """Raise ValueError unless ``output`` is a ``(B, C, H, W)`` feature map that Grad-CAM can weigh.

    A linear layer's ``(B, F)`` or the network's ``(B,)`` logit has no spatial map to upsample.
    """
    if not (isinstance(output, torch.Tensor) and output.dim() == 4):
        shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
        raise ValueError(
            f"layer {layer!r} outputs {shape}, not a (B, C, H, W) feature map; Grad-CAM needs a "
            "convolutional layer, e.g. leave layer unset for the network's own"
        )


@contextmanager
def attribution_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout noise), no in-place activations, gradients on; all restored afterwards.

    Gradients are enabled even inside ``torch.no_grad`` (Lightning's validation) and
    ``torch.inference_mode`` (``trainer.validate``/``trainer.test``); tensors made inside are normal
    tensors. Captum's warning about hooking activations is expected here and silenced.
    """
    inplace = [
        (m, m.inplace) for m in model.modules() if isinstance(getattr(m, "inplace", None), bool)
    ]
    for module, _ in inplace:
        module.inplace = False
    try:
        with (
            eval_mode(model),
            torch.inference_mode(False),
            torch.enable_grad(),
            warnings.catch_warnings(),
        ):
            warnings.filterwarnings("ignore", message="Setting backward hooks on ReLU activations")
            warnings.filterwarnings(
                "ignore", message=".*Input Tensor 0 did not already require gradients"
            )
            yield
    finally:
        for module, was_inplace in inplace:
            module.inplace = was_inplace
