"""ByteMaskDropout: nn.Dropout's distribution, scale, gradient and modes, with cheap CPU masks."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pneumonia.model.dropout import ByteMaskDropout, random_keep_mask


@pytest.mark.parametrize("p", [0.25, 0.5, 0.3, 0.05])
def test_keep_fraction_and_scale_match_p(p):
    torch.manual_seed(0)
    keep, scale = random_keep_mask(torch.empty(400_000), p)
    assert keep.dtype == torch.bool and keep.shape == (400_000,)
    assert abs(keep.float().mean().item() - (1 - p)) < 0.003
    # The scale undoes the probability actually used (1/256 or 1/65536 steps).
    assert scale == pytest.approx(1 / (1 - p), rel=1e-4)


def test_output_is_the_kept_values_scaled_and_the_expectation_is_kept():
    torch.manual_seed(0)
    x = torch.rand(64, 32, 16, 16)
    out = ByteMaskDropout(0.25).train()(x)
    kept = out != 0
    assert torch.allclose(out[kept], x[kept] / 0.75)
    assert abs(kept.float().mean().item() - 0.75) < 0.01
    assert out.mean().item() == pytest.approx(x.mean().item(), rel=0.01)


def test_gradient_is_the_same_mask_and_scale():
    torch.manual_seed(0)
    x = torch.rand(8, 4, 8, 8, requires_grad=True)
    out = ByteMaskDropout(0.5).train()(x)
    out.sum().backward()
    expected = (out.detach() != 0).float() * 2.0
    assert torch.equal(x.grad, expected)


def test_channels_last_mask_follows_the_layout():
    """The mask is drawn in memory order; the values it keeps must still be x's own, scaled."""
    torch.manual_seed(0)
    x = torch.rand(4, 8, 6, 5).contiguous(memory_format=torch.channels_last)
    out = ByteMaskDropout(0.25).train()(x)
    assert out.is_contiguous(memory_format=torch.channels_last)
    kept = out != 0
    assert torch.allclose(out[kept], x[kept] / 0.75)


def test_same_seed_same_masks_other_seed_other_masks():
    def masks(seed):
        torch.manual_seed(seed)
        return ByteMaskDropout(0.25).train()(torch.ones(10_000)) != 0

    assert torch.equal(masks(1), masks(1))
    assert not torch.equal(masks(1), masks(2))


def test_eval_mode_and_zero_p_are_the_identity_and_p_one_drops_all():
    x = torch.rand(3, 5)
    assert ByteMaskDropout(0.5).eval()(x) is x
    assert ByteMaskDropout(0.0).train()(x) is x
    assert torch.equal(ByteMaskDropout(1.0).train()(x), torch.zeros_like(x))


@pytest.mark.parametrize("p", [1e-6, 1 - 1e-6])
def test_p_too_close_to_zero_or_one_for_bytes_uses_torch_dropout(p):
    # torch's own dropout, draw for draw: rounding p to 0 or 1 drops about as many of these.
    x = torch.rand(2_000_000) + 0.5
    torch.manual_seed(0)
    out = ByteMaskDropout(p).train()(x)
    torch.manual_seed(0)
    assert torch.equal(out, F.dropout(x, p, training=True))
    with pytest.raises(ValueError, match="rounds to"):
        random_keep_mask(x, p)


def test_bf16_under_autocast():
    torch.manual_seed(0)
    layer = nn.Sequential(nn.Linear(16, 16), ByteMaskDropout(0.25)).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(torch.rand(32, 16))
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert layer[0].weight.grad is not None and torch.isfinite(layer[0].weight.grad).all()


def test_is_an_nn_dropout_with_its_state():
    layer = ByteMaskDropout(0.3)
    assert isinstance(layer, nn.Dropout) and layer.p == 0.3
    assert layer.state_dict() == {}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_uses_torch_dropout():
    torch.manual_seed(0)
    x = torch.ones(1000, device="cuda")
    torch.manual_seed(3)
    ours = ByteMaskDropout(0.5).train()(x)
    torch.manual_seed(3)
    assert torch.equal(ours, F.dropout(x, 0.5, True))
