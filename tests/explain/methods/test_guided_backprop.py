"""Guided backpropagation must guide LeakyReLU, which Captum's own class silently does not."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from captum.attr import GuidedBackprop, GuidedGradCam, LayerAttribution, LayerGradCam, Saliency
from torch import nn

from pneumonia.explain.methods.guided_backprop import LeakyGuidedBackprop
from pneumonia.explain.methods.guided_gradcam import LeakyGuidedGradCam
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


class _GuidedLeakyReLUFunction(torch.autograd.Function):
    """LeakyReLU forward; backward passes only the positive part of the usual gradient."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, slope: float) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.slope = slope
        return F.leaky_relu(x, slope)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        return F.relu(grad * torch.where(x > 0, 1.0, ctx.slope)), None


class _GuidedLeakyReLU(nn.Module):
    def __init__(self, slope: float) -> None:
        super().__init__()
        self.slope = slope

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _GuidedLeakyReLUFunction.apply(x, self.slope)


def _guided_by_hand(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Guided backpropagation written out: every LeakyReLU swapped for a guided one."""
    guided = copy.deepcopy(net)
    swapped = 0
    for parent in guided.modules():
        for name, child in parent.named_children():
            if isinstance(child, nn.LeakyReLU):
                setattr(parent, name, _GuidedLeakyReLU(child.negative_slope))
                swapped += 1
    assert swapped == 4  # three convolution blocks and the head
    inputs = x.clone().requires_grad_(True)
    (grads,) = torch.autograd.grad(guided(inputs).sum(), inputs)
    return grads


def assert_same_map(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal up to float rounding, relative to the map's scale."""
    scale = expected.abs().max()
    assert scale > 0
    torch.testing.assert_close(actual / scale, expected / scale)


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


def test_leaky_guided_backprop_guides_every_leaky_relu_of_the_study_cnn():
    net, x = _cnn(nn.LeakyReLU), torch.randn(3, 1, 32, 32)
    guided = LeakyGuidedBackprop(net).attribute(x)
    assert_same_map(guided, _guided_by_hand(net, x))
    assert not torch.allclose(guided, Saliency(net).attribute(x, abs=False), rtol=1e-3, atol=0)


def test_equals_captum_on_a_relu_only_model():
    net, x = _cnn(nn.ReLU), torch.randn(3, 1, 32, 32)
    assert_same_map(LeakyGuidedBackprop(net).attribute(x), GuidedBackprop(net).attribute(x))
    layer = net.last_conv
    assert_same_map(
        LeakyGuidedGradCam(net, layer).attribute(x, interpolate_mode="bilinear"),
        GuidedGradCam(net, layer).attribute(x, interpolate_mode="bilinear"),
    )


def test_guided_grad_cam_on_leaky_relu_is_cam_times_the_leaky_guided_gradient():
    net, x = _cnn(nn.LeakyReLU), torch.randn(3, 1, 32, 32)
    ours = LeakyGuidedGradCam(net, net.last_conv).attribute(x, interpolate_mode="bilinear")
    cam = LayerGradCam(net, net.last_conv).attribute(x, relu_attributions=True)
    cam = LayerAttribution.interpolate(cam, (32, 32), "bilinear")
    assert_same_map(ours, cam * _guided_by_hand(net, x))
    # Captum's own class multiplies by the plain gradient instead.
    captums = GuidedGradCam(net, net.last_conv).attribute(x, interpolate_mode="bilinear")
    assert_same_map(captums, cam * Saliency(net).attribute(x, abs=False))
    assert not torch.allclose(ours, captums, rtol=1e-3, atol=0)


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
