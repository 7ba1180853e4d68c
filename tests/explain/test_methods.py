import pytest
import torch

from pneumonia.explain.methods import (
    METHODS,
    ClassScores,
    attribution_fn,
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
    assert ((probabilities >= 0) & (probabilities <= 1)).all()
    assert targets.tolist() == (probabilities >= 0.5).long().tolist()


def test_normal_is_explained_through_the_negated_logit():
    model, x = _model(), torch.rand(2, 1, 32, 32)
    saliency = attribution_fn("saliency")
    normal = saliency(model, x, torch.tensor([0, 0]))
    pneumonia = saliency(model, x, torch.tensor([1, 1]))
    torch.testing.assert_close(normal, -pneumonia)


def test_attribution_is_deterministic_and_restores_train_mode_and_in_place():
    model, x = _model(), torch.rand(2, 1, 32, 32)
    model.train()
    method = attribution_fn("guided_gradcam")
    first = method(model, x, torch.tensor([1, 0]))
    second = method(model, x, torch.tensor([1, 0]))
    torch.testing.assert_close(first, second)  # no dropout noise
    assert model.training and all(m.training for m in model.modules())
    assert model.classifier.net.features[1].inplace is True


def test_works_inside_inference_mode_as_under_trainer_test():
    model = _model()
    with torch.inference_mode():
        x = torch.rand(2, 1, 32, 32)
        maps = attribution_fn("guided_gradcam")(model, x, torch.tensor([1, 1]))
    assert maps.abs().sum() > 0


def test_grad_cam_upsampling_mode_is_a_setting():
    model, x = _model(), torch.rand(2, 1, 32, 32)
    targets = torch.tensor([1, 1])
    nearest = attribution_fn("gradcam", interpolate_mode="nearest")(model, x, targets)
    bilinear = attribution_fn("gradcam", interpolate_mode="bilinear")(model, x, targets)
    assert not torch.allclose(nearest, bilinear)


def test_layers_and_targets_are_validated():
    model = _model()
    assert find_layer(model, None) is model.classifier.net.features[8]
    assert find_layer(model, "net.features.3") is model.classifier.net.features[3]
    with pytest.raises(
        ValueError, match=r"layer 'net.nothing' is not in the model; convolutions are"
    ):
        find_layer(model, "net.nothing")
    scores = torch.tensor([[0.3, -0.3], [-2.0, 2.0]])
    assert resolve_targets("predicted", scores).tolist() == [0, 1]
    assert resolve_targets("normal", scores).tolist() == [0, 0]
    assert resolve_targets(1, scores).tolist() == [1, 1]
    with pytest.raises(ValueError, match="target='COVID'"):
        resolve_targets("COVID", scores)
    with pytest.raises(ValueError, match="unknown attribution method 'lime'"):
        attribution_fn("lime")
