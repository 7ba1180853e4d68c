import pytest
import torch

from pneumonia.model.study_cnn import StudyCNN


@pytest.mark.parametrize("size", [32, 64, 96, 128, 224])
def test_one_logit_per_image_at_any_size(size):
    net = StudyCNN(image_size=size)
    logits = net(torch.randn(3, 1, size, size))
    assert logits.shape == (3,)


def test_study_block_order():
    net = StudyCNN()
    kinds = [type(m).__name__ for m in net.features]
    assert kinds == ["Conv2d", "LeakyReLU", "MaxPool2d", "Dropout"] * 3
    assert isinstance(net.last_conv, torch.nn.Conv2d) and net.last_conv.out_channels == 128


def test_in_place_activation_changes_nothing():
    torch.manual_seed(0)
    a = StudyCNN(image_size=64, inplace=False).eval()
    b = StudyCNN(image_size=64, inplace=True).eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(4, 1, 64, 64, requires_grad=True)
    y = x.detach().clone().requires_grad_()
    a(x).sum().backward()
    b(y).sum().backward()
    torch.testing.assert_close(x.grad, y.grad)


def test_too_small_and_even_kernel_are_rejected():
    with pytest.raises(ValueError, match="image_size=16"):
        StudyCNN(image_size=16)
    with pytest.raises(ValueError, match="kernel_size=4"):
        StudyCNN(kernel_size=4)
