"""One vocabulary of attribution settings for the training callback and explain.py."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hydra.utils import instantiate

from pneumonia.errors import ConfigError
from pneumonia.explain.callback import AttributionMapsCallback
from pneumonia.explain.methods import METHODS, resolve_targets
from pneumonia.explain.settings import INTERPOLATE_MODES, AttributionSettings

FIELDS = [field.name for field in dataclasses.fields(AttributionSettings)]


def test_defaults_are_the_studys_and_frozen():
    settings = AttributionSettings()
    assert (settings.method, settings.target, settings.layer, settings.interpolate_mode) == (
        "guided_gradcam",
        "predicted",
        None,
        "bilinear",
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.method = "saliency"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("target", "explained"),
    [("predicted", [0, 1]), ("NORMAL", [0, 0]), ("pneumonia", [1, 1]), (0, [0, 0]), (1, [1, 1]),
     ("1", [1, 1]), ("0", [0, 0])],
)  # fmt: skip
def test_every_accepted_target_resolves_to_the_class_it_names(target, explained):
    settings = AttributionSettings(target=target)
    probabilities = torch.tensor([0.2, 0.7])
    assert resolve_targets(settings.target, probabilities, 0.5).tolist() == explained


@pytest.mark.parametrize(
    ("key", "value", "choices"),
    [
        ("method", "lime", str(list(METHODS))),
        ("target", "COVID", "['predicted', 'NORMAL', 'PNEUMONIA']"),
        ("target", 2, "['predicted', 'NORMAL', 'PNEUMONIA']"),
        ("target", True, "['predicted', 'NORMAL', 'PNEUMONIA']"),
        ("layer", 4, "module path"),
        ("interpolate_mode", "linear", str(list(INTERPOLATE_MODES))),
        ("batch_size", 0, "at least 1"),
        ("batch_size", 2.5, "at least 1"),
    ],
)
def test_a_bad_value_is_refused_naming_the_key_and_the_choices(key, value, choices):
    with pytest.raises(ValueError) as raised:
        AttributionSettings(**{key: value})
    assert isinstance(raised.value, ConfigError)
    assert f"{key}={value!r}" in str(raised.value) and choices in str(raised.value)


def test_with_method_and_its_attribution_function():
    settings = AttributionSettings(layer="net.features.3", interpolate_mode="nearest")
    gradcam = settings.with_method("gradcam")
    assert dataclasses.replace(gradcam, method="guided_gradcam") == settings
    assert gradcam.attribution_fn().__name__ == "gradcam"


def test_both_yaml_files_use_the_settings_keys(compose_config):
    callback = compose_config(config_name="train").callbacks.attribution_maps
    explain = compose_config("ckpt_path=x.ckpt", config_name="explain")
    assert set(FIELDS) <= set(callback)
    # explain.py computes several methods and draws one; every other key is shared as is.
    assert set(FIELDS) - {"method"} <= set(explain)
    for key in set(FIELDS) - {"method", "batch_size"}:
        assert callback[key] == explain[key], key
    assert callback.method == explain.figure_method and callback.method in explain.methods


def test_the_callback_takes_and_checks_the_same_settings(compose_config):
    cfg = compose_config("callbacks.attribution_maps.target=NORMAL", config_name="train")
    callback = instantiate(cfg.callbacks.attribution_maps)
    assert callback.settings == AttributionSettings(target="NORMAL")
    assert callback.method == "guided_gradcam" and callback.target == "NORMAL"
    with pytest.raises(ConfigError, match=r"interpolate_mode='linear' must be one of"):
        AttributionMapsCallback(interpolate_mode="linear")


def test_explain_settings_come_from_its_config(compose_config):
    cfg = compose_config(
        "ckpt_path=x.ckpt", "figure_method=gradcam", "target=NORMAL", "layer=net.features.3",
        "interpolate_mode=nearest", "batch_size=4", config_name="explain",
    )  # fmt: skip
    assert AttributionSettings.from_explain_config(cfg) == AttributionSettings(
        "gradcam", "NORMAL", "net.features.3", "nearest", 4
    )
    assert AttributionSettings.from_explain_config(cfg, method="saliency").method == "saliency"
