import copy

import pytest
import torch
from torch import nn

from pneumonia.explain.methods import ClassScores, attribution_fn
from pneumonia.model.study_cnn import StudyCNN


@pytest.mark.parametrize("size", [32, 64, 100, 128, 224])
def test_one_logit_per_image_at_any_size(size):
    torch.manual_seed(0)
    net = StudyCNN(image_size=size).eval()
    # Three 2x2 poolings (floor division) give the flattened size of the first linear layer.
    assert net.classifier[1].in_features == 128 * (size // 8) ** 2
    images = torch.randn(2, 1, size, size)
    logits = net(images)
    assert logits.shape == (2,)
    # Each logit depends on its own image only.
    alone = torch.stack([net(image[None])[0] for image in images])
    torch.testing.assert_close(logits, alone)


def _kinds(net):
    kinds = (nn.Conv2d, nn.LeakyReLU, nn.MaxPool2d, nn.Dropout)
    return [next(k.__name__ for k in kinds if isinstance(m, k)) for m in net.features]


def test_block_order_pools_before_the_activation_unless_the_slope_is_negative():
    net = StudyCNN()
    assert _kinds(net) == ["Conv2d", "MaxPool2d", "LeakyReLU", "Dropout"] * 3
    assert net.last_conv is net.features[8]
    assert (
        _kinds(StudyCNN(negative_slope=-0.1)) == ["Conv2d", "LeakyReLU", "MaxPool2d", "Dropout"] * 3
    )


def _study_order(net: StudyCNN) -> StudyCNN:
    """The same network and weights in the study's Conv -> LeakyReLU -> MaxPool order."""
    study = copy.deepcopy(net)
    for block in range(3):
        f = study.features
        f[4 * block + 1], f[4 * block + 2] = f[4 * block + 2], f[4 * block + 1]
    return study


def test_pooling_first_gives_the_study_orders_outputs_gradients_and_guided_maps():
    torch.manual_seed(0)
    net = StudyCNN(image_size=64, inplace=False).eval()
    study = _study_order(net)
    assert _kinds(study) == ["Conv2d", "LeakyReLU", "MaxPool2d", "Dropout"] * 3
    x = torch.rand(4, 1, 64, 64)
    inputs = [x.clone().requires_grad_(True) for _ in range(2)]
    outputs = [model(i) for model, i in zip((net, study), inputs, strict=True)]
    torch.testing.assert_close(outputs[0], outputs[1])
    for out in outputs:
        out.sum().backward()
    torch.testing.assert_close(inputs[0].grad, inputs[1].grad)
    for a, b in zip(net.parameters(), study.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad)
    scores = [ClassScores(m) for m in (net, study)]
    maps = [attribution_fn("guided_gradcam")(s, x, torch.tensor([1, 0, 1, 0])) for s in scores]
    torch.testing.assert_close(maps[0], maps[1])


def test_every_setting_reaches_its_layers():
    net = StudyCNN(
        image_size=64,
        in_channels=3,
        channels=(8, 16, 24),
        kernel_size=5,
        negative_slope=0.2,
        dropout=0.1,
        hidden_features=7,
        head_dropout=0.3,
    )
    convs = [m for m in net.features if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(3, 8), (8, 16), (16, 24)]
    assert {(c.kernel_size, c.padding) for c in convs} == {((5, 5), (2, 2))}
    activations = [m for m in net.modules() if isinstance(m, nn.LeakyReLU)]
    assert [a.negative_slope for a in activations] == [0.2] * 4
    dropouts = [m.p for m in net.modules() if isinstance(m, nn.Dropout)]
    assert dropouts == [0.1, 0.1, 0.1, 0.3]
    assert (net.classifier[1].in_features, net.classifier[1].out_features) == (24 * 8 * 8, 7)
    assert net(torch.randn(2, 3, 64, 64)).shape == (2,)


def test_in_place_activation_changes_nothing():
    torch.manual_seed(0)
    a = StudyCNN(image_size=64, inplace=False).eval()
    b = StudyCNN(image_size=64, inplace=True).eval()
    b.load_state_dict(a.state_dict())
    assert [m.inplace for m in b.features if isinstance(m, nn.LeakyReLU)] == [True] * 3
    assert not any(m.inplace for m in a.modules() if isinstance(m, nn.LeakyReLU))
    x = torch.randn(4, 1, 64, 64, requires_grad=True)
    y = x.detach().clone().requires_grad_()
    out_a, out_b = a(x), b(y)
    torch.testing.assert_close(out_a, out_b)
    out_a.sum().backward()
    out_b.sum().backward()
    torch.testing.assert_close(x.grad, y.grad)


def test_a_zero_slope_turns_in_place_off():
    # In-place LeakyReLU cannot be differentiated with a slope of 0 (it cannot tell the sign back).
    net = StudyCNN(image_size=32, negative_slope=0.0, inplace=True)
    assert not any(m.inplace for m in net.modules() if isinstance(m, nn.LeakyReLU))
    x = torch.randn(2, 1, 32, 32, requires_grad=True)
    net(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_too_small_and_even_kernel_are_rejected():
    with pytest.raises(ValueError, match="image_size=16"):
        StudyCNN(image_size=16)
    with pytest.raises(ValueError, match="kernel_size=4"):
        StudyCNN(kernel_size=4)
