"""The attribution settings, one vocabulary for the training callback and ``explain.py``.

``conf/callbacks/default.yaml``'s ``attribution_maps`` and ``conf/explain.yaml`` use these key names
for the same meaning; both build an :class:`AttributionSettings`, so a value is checked, and refused
with the same message, wherever it is set. ``explain.py`` computes several methods (``methods``)
and draws one (``figure_method``): each of them is an :attr:`AttributionSettings.method`.

This module imports neither torch nor Captum, so configs can be checked before anything heavy loads.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from pneumonia import CLASS_NAMES, is_whole_number
from pneumonia.errors import ConfigError

if TYPE_CHECKING:
    from pneumonia.explain.methods import AttributionFn

METHODS: tuple[str, ...] = ("guided_gradcam", "gradcam", "guided_backprop", "saliency")
"""The attribution methods, one module each in :mod:`pneumonia.explain.methods`."""

LAYER_METHODS: tuple[str, ...] = ("guided_gradcam", "gradcam")
"""The methods that weigh a layer's feature map (Grad-CAM's ``layer``); the others ignore it."""

SIGNS: tuple[str, ...] = ("all", "positive", "negative", "absolute_value")
"""Which part of a signed map a figure shows (Captum's ``visualize_image_attr`` ``sign``)."""

TARGETS: tuple[str, ...] = ("predicted", *CLASS_NAMES)
"""Which class is explained: the predicted one, or a class by name (any case) or index 0/1."""

INTERPOLATE_MODES: tuple[str, ...] = ("nearest", "bilinear", "bicubic", "area", "nearest-exact")
"""Grad-CAM's upsampling modes (``torch.nn.functional.interpolate`` on a 2-D map)."""


def check_method(method: Any, key: str = "method", methods: tuple[str, ...] = METHODS) -> None:
    """Raises ConfigError (a ValueError) naming ``key`` and ``methods`` unless ``method`` is one."""
    if method not in methods:
        raise ConfigError(
            f"{key}={method!r} is not an attribution method; choose from {list(methods)}"
        )


def check_target(target: Any, key: str = "target") -> None:
    """Raises ConfigError unless ``target`` is one of ``TARGETS`` (any case) or a class index 0/1."""
    if isinstance(target, bool):
        valid = False
    elif isinstance(target, int):
        valid = target in (0, 1)
    elif isinstance(target, str):
        valid = target.lower() in {t.lower() for t in TARGETS} or target in {"0", "1"}
    else:
        valid = False
    if not valid:
        raise ConfigError(
            f"{key}={target!r} must be one of {list(TARGETS)} or a class index 0 or 1"
        )


def check_layer(layer: Any, key: str = "layer") -> None:
    """Raises ConfigError unless ``layer`` is ``None`` or a module path such as ``net.features.4``
    (an empty one means ``None``).

    Whether the model has that module is only known with the model: see
    :func:`pneumonia.explain.methods.find_layer`.
    """
    if layer is not None and not isinstance(layer, str):
        raise ConfigError(
            f"{key}={layer!r} must be null (the network's own Grad-CAM layer) or a module path "
            "such as net.features.4"
        )


def check_interpolate_mode(mode: Any, key: str = "interpolate_mode") -> None:
    """Raises ConfigError unless ``mode`` is one of :data:`INTERPOLATE_MODES`."""
    if mode not in INTERPOLATE_MODES:
        raise ConfigError(f"{key}={mode!r} must be one of {list(INTERPOLATE_MODES)}")


def check_batch_size(value: Any, key: str = "batch_size", allow_none: bool = True) -> None:
    """Raises ConfigError unless ``value`` is a whole number of at least 1 (or ``None`` if allowed)."""
    if value is None and allow_none:
        return
    if not is_whole_number(value) or value < 1:
        allowed = " (or null: all images at once)" if allow_none else ""
        raise ConfigError(f"{key}={value!r} must be a whole number of at least 1{allowed}")


@dataclass(frozen=True)
class AttributionSettings:
    """How attribution maps are computed; checked on construction.

    Attributes:
        method: one of :data:`METHODS`.
        target: the class explained: ``"predicted"``, ``"NORMAL"``/``"PNEUMONIA"`` (any case) or the
            class index 0/1.
        layer: Grad-CAM's layer as a module path in the LightningModule (e.g. ``net.features.4``);
            ``None``: the network's own choice, else its last convolution.
        interpolate_mode: how Grad-CAM's map is upsampled to the input, one of
            :data:`INTERPOLATE_MODES` (the Grad-CAM paper's is ``"bilinear"``).
        batch_size: images per attribution call; ``None``: all at once.

    Raises:
        ConfigError: a ``ValueError`` naming the key, the value and the valid values.
    """

    method: str = "guided_gradcam"
    target: str | int = "predicted"
    layer: str | None = None
    interpolate_mode: str = "bilinear"
    batch_size: int | None = None

    def __post_init__(self) -> None:
        check_method(self.method)
        check_target(self.target)
        check_layer(self.layer)
        check_interpolate_mode(self.interpolate_mode)
        check_batch_size(self.batch_size)

    @classmethod
    def from_explain_config(cls, cfg: Any, method: str | None = None) -> AttributionSettings:
        """The settings of ``conf/explain.yaml`` for ``method`` (default: its ``figure_method``)."""
        return cls(
            method=method if method is not None else cfg.figure_method,
            target=cfg.target,
            layer=cfg.layer,
            interpolate_mode=cfg.interpolate_mode,
            batch_size=cfg.batch_size,
        )

    def with_method(self, method: str) -> AttributionSettings:
        """The same settings for another method."""
        return replace(self, method=method)

    def attribution_fn(self) -> AttributionFn:
        """The method as an ``AttributionFn``: ``(class_model, images (B, 1, H, W), targets (B,))``
        -> maps ``(B, 1, H, W)``, with this layer and upsampling."""
        from pneumonia.explain.methods import attribution_fn

        return attribution_fn(self.method, self.layer, self.interpolate_mode)
