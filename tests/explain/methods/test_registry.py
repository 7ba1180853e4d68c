import pytest
import torch

from pneumonia.errors import ConfigError
from pneumonia.explain.methods import (
    METHODS,
    ClassScores,
    attribution_fn,
    eval_mode,
    explain,
    find_layer,
    resolve_targets,
)
from pneumonia.model.classifier import XrayClassifier

NET = {
    "_target_": "pneumonia.model.study_cnn.StudyCNN",
    "channels": [4, 8, 8],
    "hidden_features": 8,
}


def assert_same_map(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to float rounding, relative to the map's scale (an untrained model's Guided
    Grad-CAM is about 1e-6, below assert_close's default absolute tolerance)."""
    scale = expected.abs().max()
    assert scale > 0
    torch.testing.assert_close(actual / scale, expected / scale)


def _model(size: int = 32) -> ClassScores:
    torch.manual_seed(0)
    module = XrayClassifier(
        net={**NET, "image_size": size}, optimizer={"_target_": "torch.optim.Adam"}, image_size=size
    )
    return ClassScores(module)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("size", [32, 100])
def test_every_method_gives_one_map_per_image_at_input_size(method, size):
    model, x = _model(size), torch.rand(3, 1, size, size)
    maps, probabilities, targets = explain(model, x, attribution_fn(method))
    assert maps.shape == (3, 1, size, size) and torch.isfinite(maps).all()
    with eval_mode(model), torch.no_grad():
        logits = model.classifier(x)
    torch.testing.assert_close(probabilities, torch.sigmoid(logits.double()))
    assert targets.tolist() == (logits > 0).long().tolist()


def test_the_predicted_class_is_the_decision_at_the_stored_threshold_and_temperature():
    model, x = _model(), torch.rand(8, 1, 32, 32)
    with eval_mode(model), torch.no_grad():
        logits = model.classifier(x)
    # A threshold between the images' calibrated probabilities: some are called PNEUMONIA below 0.5.
    calibrated = torch.sigmoid(logits.double() / 2.0)
    model.classifier.set_operating_point(float(calibrated.median()), 2.0)
    threshold = model.classifier.threshold  # as stored (float32)
    _, probabilities, targets = explain(model, x, attribution_fn("saliency"))
    torch.testing.assert_close(probabilities, calibrated)
    assert targets.tolist() == (calibrated >= threshold).long().tolist()
    assert 0 < int(targets.sum()) < len(x) and threshold != 0.5


def test_methods_follow_their_definitions():
    model, x = _model(), torch.rand(2, 1, 32, 32)
    targets = torch.tensor([1, 0])
    maps = {method: attribution_fn(method)(model, x, targets) for method in METHODS}
    # Saliency: the signed gradient of the explained class score, in eval mode.
    inputs = x.clone().requires_grad_(True)
    with eval_mode(model):
        (gradient,) = torch.autograd.grad(model(inputs).gather(1, targets[:, None]).sum(), inputs)
    assert_same_map(maps["saliency"], gradient)
    # Guided Grad-CAM: the upsampled, ReLU'd Grad-CAM times guided backpropagation.
    assert_same_map(maps["guided_gradcam"], maps["gradcam"] * maps["guided_backprop"])
    assert (maps["gradcam"] >= 0).all() and maps["gradcam"].abs().sum() > 0


def test_normal_is_explained_through_the_negated_logit():
    model, x = _model(), torch.rand(2, 1, 32, 32)
    saliency = attribution_fn("saliency")
    normal = saliency(model, x, torch.tensor([0, 0]))
    pneumonia = saliency(model, x, torch.tensor([1, 1]))
    assert_same_map(normal, -pneumonia)


def test_attribution_is_deterministic_and_restores_train_mode_and_in_place():
    model, x = _model(), torch.rand(2, 1, 32, 32)
    model.train()
    method = attribution_fn("guided_gradcam")
    first = method(model, x, torch.tensor([1, 0]))
    second = method(model, x, torch.tensor([1, 0]))
    for a, b in zip(first, second, strict=True):
        assert_same_map(a, b)  # no dropout noise
    assert model.training and all(m.training for m in model.modules())
    assert model.classifier.net.features[2].inplace is True  # the first LeakyReLU


def test_works_inside_inference_mode_as_under_trainer_test():
    model, x = _model(), torch.rand(2, 1, 32, 32)
    method, targets = attribution_fn("guided_gradcam"), torch.tensor([1, 1])
    expected = method(model, x, targets)
    with torch.inference_mode():
        maps = method(model, x.clone(), targets)
    assert_same_map(maps, expected)


def test_grad_cam_upsampling_mode_is_a_setting():
    model, x = _model(), torch.rand(2, 1, 32, 32)
    targets = torch.tensor([1, 0])
    nearest = attribution_fn("gradcam", interpolate_mode="nearest")(model, x, targets)
    bilinear = attribution_fn("gradcam", interpolate_mode="bilinear")(model, x, targets)
    # The last convolution sees 8x8: nearest upsampling repeats each value over 4x4 pixels,
    # bilinear (the default) blends neighbours.
    blocks = nearest[..., ::4, ::4].repeat_interleave(4, dim=-2).repeat_interleave(4, dim=-1)
    assert_same_map(nearest, blocks)
    assert not torch.allclose(
        bilinear, bilinear[..., ::4, ::4].repeat_interleave(4, -2).repeat_interleave(4, -1)
    )
    assert_same_map(attribution_fn("gradcam")(model, x, targets), bilinear)


def test_layers_and_targets_are_validated():
    model = _model()
    assert find_layer(model, None) is model.classifier.net.features[8]
    assert find_layer(model, "net.features.3") is model.classifier.net.features[3]
    with pytest.raises(
        ValueError, match=r"layer 'net.nothing' is not in the model; convolutions are"
    ):
        find_layer(model, "net.nothing")
    probabilities = torch.tensor([0.2, 0.45, 0.9])
    # "predicted" is the decision at the stored threshold: 0.45 is PNEUMONIA at 0.4, not at 0.5.
    assert resolve_targets("predicted", probabilities, 0.4).tolist() == [0, 1, 1]
    assert resolve_targets("predicted", probabilities, 0.5).tolist() == [0, 0, 1]
    assert resolve_targets("normal", probabilities, 0.4).tolist() == [0, 0, 0]
    assert resolve_targets(1, probabilities, 0.4).tolist() == [1, 1, 1]
    with pytest.raises(ConfigError, match="target='COVID'"):
        resolve_targets("COVID", probabilities, 0.5)
    with pytest.raises(ConfigError, match="target=2"):
        resolve_targets(2, probabilities, 0.5)
    with pytest.raises(ValueError, match="unknown attribution method 'lime'"):
        attribution_fn("lime")
