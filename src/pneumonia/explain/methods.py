"""Attribution methods for single-logit X-ray classifiers, behind one signature.

Every method here is an ``AttributionFn``: ``(class_model, images, targets) -> attributions`` with
images ``(B, 1, H, W)`` float in [0, 1], targets ``(B,)`` class indices and attributions
``(B, 1, H, W)``. ``class_model`` is :class:`ClassScores`: the classifier's one logit turned into the
scores ``[-logit, logit]`` of (NORMAL, PNEUMONIA), so explaining NORMAL attributes the negated logit
(a confident NORMAL image otherwise gets an all-zero, ReLU'd Grad-CAM).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from captum.attr import LayerAttribution, LayerGradCam, Saliency
from torch import nn

from pneumonia import CLASS_NAMES
from pneumonia.explain.guided_backprop import LeakyGuidedBackprop
from pneumonia.explain.guided_gradcam import LeakyGuidedGradCam

AttributionFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
METHODS: tuple[str, ...] = ("guided_gradcam", "gradcam", "guided_backprop", "saliency")


class ClassScores(nn.Module):
    """Wraps a single-logit classifier: images ``(B, 1, H, W)`` in [0, 1] -> scores ``(B, 2)``.

    ``sigmoid(scores[:, c])`` is the probability of class ``c``.
    """

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logit = self.classifier(images)
        return torch.stack([-logit, logit], dim=1)


def find_layer(model: nn.Module, name: str | None) -> nn.Module:
    """The module called ``name`` (dotted path, e.g. ``net.features.6``), else the network's own
    ``gradcam_layer`` if it names one (ResNet-18: its last stage), else the last ``Conv2d``.

    Names are relative to the classifier, also when ``model`` is its :class:`ClassScores` wrapper.
    """
    if isinstance(model, ClassScores):
        model = model.classifier
    preferred = getattr(getattr(model, "net", None), "gradcam_layer", None)
    if not name and isinstance(preferred, nn.Module):
        return preferred
    if name:
        try:
            return model.get_submodule(name)
        except AttributeError as err:
            convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
            raise ValueError(
                f"layer {name!r} is not in the model; convolutions are {convs}"
            ) from err
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError(
            "the model has no Conv2d layer for Grad-CAM; name one with layer=<module path>"
        )
    return convs[-1]


def resolve_targets(target: str | int, scores: torch.Tensor) -> torch.Tensor:
    """Class index per image: ``"predicted"`` (from ``scores (B, 2)``), a class name, or an index."""
    if isinstance(target, str) and target.lower() == "predicted":
        return scores.argmax(dim=1)
    if isinstance(target, str):
        upper = target.upper()
        if upper not in CLASS_NAMES:
            raise ValueError(
                f"target={target!r} must be 'predicted', {' or '.join(CLASS_NAMES)}, 0 or 1"
            )
        index = CLASS_NAMES.index(upper)
    else:
        index = int(target)
        if index not in (0, 1):
            raise ValueError(
                f"target={target!r} must be 'predicted', {' or '.join(CLASS_NAMES)}, 0 or 1"
            )
    return torch.full((scores.shape[0],), index, dtype=torch.long, device=scores.device)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule of ``model`` in eval mode, then restore each one's own previous mode.

    ``model.train(previous)`` would not do: it overwrites a mix of modes (e.g. a frozen, eval-mode
    backbone inside a training model) with a single flag.
    """
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


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


def _guided_gradcam(model, images, targets, layer: str | None, interpolate_mode: str):
    explainer = LeakyGuidedGradCam(model, find_layer(model, layer))
    return explainer.attribute(images, target=targets, interpolate_mode=interpolate_mode)


def _gradcam(model, images, targets, layer: str | None, interpolate_mode: str):
    cam = LayerGradCam(model, find_layer(model, layer)).attribute(
        images, target=targets, relu_attributions=True
    )
    return LayerAttribution.interpolate(cam, tuple(images.shape[-2:]), interpolate_mode)


def _guided_backprop(model, images, targets, layer: str | None, interpolate_mode: str):
    return LeakyGuidedBackprop(model).attribute(images, target=targets)


def _saliency(model, images, targets, layer: str | None, interpolate_mode: str):
    return Saliency(model).attribute(images, target=targets, abs=False)


_IMPLEMENTATIONS = {
    "guided_gradcam": _guided_gradcam,
    "gradcam": _gradcam,
    "guided_backprop": _guided_backprop,
    "saliency": _saliency,
}


def attribution_fn(
    method: str, layer: str | None = None, interpolate_mode: str = "bilinear"
) -> AttributionFn:
    """The ``AttributionFn`` of ``method`` (one of ``METHODS``); ``layer`` is Grad-CAM's target layer."""
    if method not in _IMPLEMENTATIONS:
        raise ValueError(f"unknown attribution method {method!r}; choose from {list(METHODS)}")
    implementation = _IMPLEMENTATIONS[method]

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
        ``(maps (B, 1, H, W), probabilities (B,) of PNEUMONIA, targets (B,) explained class)``.
    """
    scores = class_scores(model, images)
    targets = resolve_targets(target, scores)
    return method(model, images, targets), torch.sigmoid(scores[:, 1]), targets
