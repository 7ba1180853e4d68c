"""Guided backpropagation must guide LeakyReLU, which Captum's own class silently does not."""

import warnings

import pytest
import torch
from captum.attr import GuidedBackprop, GuidedGradCam, Saliency
from torch import nn

from pneumonia.explain.guided_backprop import LeakyGuidedBackprop
from pneumonia.explain.guided_gradcam import LeakyGuidedGradCam
from pneumonia.model.study_cnn import StudyCNN


def _cnn(activation: type[nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    net = StudyCNN(image_size=32, channels=(4, 8, 8), hidden_features=8, inplace=False)
    if activation is nn.ReLU:
        for parent in net.modules():
            for name, child in parent.named_children():
                if isinstance(child, nn.LeakyReLU):
                    setattr(parent, name, nn.ReLU())
    return net.eval()


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def test_captum_guided_backprop_is_the_plain_gradient_on_leaky_relu():
    # The pitfall this module exists for: documented here so a Captum fix would show up.
    net, x = _cnn(nn.LeakyReLU), torch.randn(3, 1, 32, 32)
    torch.testing.assert_close(
        GuidedBackprop(net).attribute(x), Saliency(net).attribute(x, abs=False)
    )


def test_leaky_guided_backprop_differs_from_the_plain_gradient():
    net, x = _cnn(nn.LeakyReLU), torch.randn(3, 1, 32, 32)
    guided = LeakyGuidedBackprop(net).attribute(x)
    plain = Saliency(net).attribute(x, abs=False)
    assert not torch.allclose(guided, plain)


def test_equals_captum_on_a_relu_only_model():
    net, x = _cnn(nn.ReLU), torch.randn(3, 1, 32, 32)
    torch.testing.assert_close(
        LeakyGuidedBackprop(net).attribute(x), GuidedBackprop(net).attribute(x)
    )
    layer = net.last_conv
    torch.testing.assert_close(
        LeakyGuidedGradCam(net, layer).attribute(x, interpolate_mode="bilinear"),
        GuidedGradCam(net, layer).attribute(x, interpolate_mode="bilinear"),
    )


def test_guided_grad_cam_on_leaky_relu_is_not_gradient_times_cam():
    net, x = _cnn(nn.LeakyReLU), torch.randn(3, 1, 32, 32)
    ours = LeakyGuidedGradCam(net, net.last_conv).attribute(x)
    captums = GuidedGradCam(net, net.last_conv).attribute(x)
    assert not torch.allclose(ours, captums)


def test_guided_rule_on_a_model_with_a_known_answer():
    # y = w . leaky(x): plain gradient w * (1 or slope); guided keeps only its positive part.
    slope = 0.1
    linear = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[2.0, -3.0, 5.0, -7.0]]))
    net = nn.Sequential(nn.LeakyReLU(slope), linear)
    x = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    guided = LeakyGuidedBackprop(net).attribute(x)
    torch.testing.assert_close(guided, torch.tensor([[2.0, 0.0, 5.0 * slope, 0.0]]))
