"""The one-forward Guided Grad-CAM equals Captum's two-pass one on every registered network."""

import pytest
import torch
from torch import nn

from pneumonia.explain.methods import ClassScores, attribution_fn, find_layer
from pneumonia.explain.methods.common import attribution_mode
from pneumonia.explain.methods.guided_gradcam import LeakyGuidedGradCam, guided_gradcam
from pneumonia.model.classifier import XrayClassifier
from tests.explain.methods.test_registry import assert_same_map

TWO = torch.tensor([0, 1])
NETWORKS = {
    "study_cnn": {"_target_": "pneumonia.model.study_cnn.StudyCNN"},
    "bn_cnn": {"_target_": "pneumonia.model.bn_cnn.BatchNormCNN", "channels": [8, 16, 16]},
    "resnet18": {"_target_": "pneumonia.model.resnet.ResNet18"},
    "densenet121": {"_target_": "pneumonia.model.densenet.DenseNet121"},
}


def _class_model(net: dict, size: int) -> ClassScores:
    torch.manual_seed(0)
    net = {**net, "image_size": size} if "study_cnn" in net["_target_"] else net
    module = XrayClassifier(net=net, optimizer={"_target_": "torch.optim.Adam"}, image_size=size)
    # Trained-looking weights: BatchNorm statistics away from their initial identity.
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return ClassScores(module)


@pytest.mark.parametrize("name", list(NETWORKS))
@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_equals_captums_guided_gradcam(name, mode):
    size = 64
    model = _class_model(NETWORKS[name], size)
    x = torch.rand(3, 1, size, size)
    targets = torch.tensor([1, 0, 1])
    with attribution_mode(model):
        reference = LeakyGuidedGradCam(model, find_layer(model, None)).attribute(
            x.clone().requires_grad_(True), target=targets, interpolate_mode=mode
        )
        ours = guided_gradcam(model, x.clone().requires_grad_(True), targets, None, mode)
    assert ours.shape == (3, 1, size, size)
    assert_same_map(ours, reference.detach())


@pytest.mark.parametrize(
    ("name", "size", "layer"),
    [
        ("study_cnn", 32, "net.features.4"),
        # ResNet's bn2 output gets the identity added in place; Grad-CAM must weigh it as it was.
        ("resnet18", 64, "net.body.layer4.1.bn2"),
    ],
)
def test_a_named_layer_through_the_registry_path(name, size, layer):
    model = _class_model(NETWORKS[name], size)
    x, targets = torch.rand(2, 1, size, size), torch.tensor([1, 0])
    with attribution_mode(model):
        reference = LeakyGuidedGradCam(model, find_layer(model, layer)).attribute(
            x.clone().requires_grad_(True), target=targets, interpolate_mode="bilinear"
        )
    ours = attribution_fn("guided_gradcam", layer=layer)(model, x, targets)
    assert_same_map(ours, reference.detach())


def test_hooks_are_removed_and_the_model_is_unchanged():
    model = _class_model(NETWORKS["study_cnn"], 32).eval()
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        before = model(x)
    inputs = x.clone().requires_grad_(True)
    (reference,) = torch.autograd.grad(model(inputs)[:, 1].sum(), inputs)
    attribution_fn("guided_gradcam")(model, x, torch.tensor([1, 1]))
    hooks = [
        m for m in model.modules() if m._forward_pre_hooks or m._forward_hooks or m._backward_hooks
    ]
    assert hooks == []
    # Plain gradients afterwards are not guided.
    assert not model.training
    inputs = x.clone().requires_grad_(True)
    (plain,) = torch.autograd.grad(model(inputs)[:, 1].sum(), inputs)
    torch.testing.assert_close(plain, reference)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before)


def test_a_layer_the_score_does_not_depend_on_is_refused():
    model = _class_model(NETWORKS["study_cnn"], 32)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    with attribution_mode(model), pytest.raises(ValueError, match="no gradient"):
        guided_gradcam(model, torch.rand(1, 1, 32, 32), torch.tensor([1]), None, "bilinear")


@pytest.mark.parametrize("method", ["gradcam", "guided_gradcam"])
@pytest.mark.parametrize(
    ("layer", "message"),
    [("augmentation", "'augmentation' is not part of the network"),
     ("normalization", "'normalization' is not part of the network"),
     ("train_metrics", "'train_metrics' is not part of the network"),
     ("net.classifier.0", r"'net.classifier.0' outputs \(2, 2048\), not a \(B, C, H, W\)"),
     ("net", r"'net' outputs \(2,\), not a \(B, C, H, W\) feature map")],
)  # fmt: skip
def test_a_layer_grad_cam_cannot_weigh_is_refused_by_name(method, layer, message):
    augmentation = {"_target_": "pneumonia.model.augmentation.BatchAugmentation"}
    module = XrayClassifier(
        net={**NETWORKS["study_cnn"], "image_size": 32}, optimizer={"_target_": "torch.optim.Adam"},
        image_size=32, augmentation=augmentation,
    )  # fmt: skip
    with pytest.raises(ValueError, match=message):
        attribution_fn(method, layer=layer)(ClassScores(module), torch.rand(2, 1, 32, 32), TWO)


class _SkipsABranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.unused = nn.Conv2d(2, 2, 1)

    def forward(self, x):
        return self.conv(x).mean(dim=(2, 3))


@pytest.mark.parametrize("method", ["gradcam", "guided_gradcam"])
def test_a_layer_the_forward_pass_skips_is_named(method):
    with pytest.raises(ValueError, match="layer 'unused' was not called by the model's forward"):
        attribution_fn(method, layer="unused")(_SkipsABranch(), torch.rand(2, 1, 8, 8), TWO)
