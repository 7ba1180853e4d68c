"""Dropout whose CPU masks come from random bytes: the same distribution, a fraction of the cost.

PyTorch's CPU dropout draws one ``bernoulli_`` number per element through its Mersenne Twister,
one element at a time: on the 2-core machine this project is developed on, the masks of the study
CNN's four dropouts took 40% of a bf16 training step (25 ms for 4 M elements, where the LeakyReLU
on the same tensor takes 1 ms). :class:`ByteMaskDropout` draws 64 random bits per generator call
and cuts them into one byte per element (two bytes when ``p`` is not a multiple of 1/256), which
made the step 1.6x faster. On CUDA it is plain ``F.dropout`` (Philox, already fused).

Masks come from PyTorch's default generator, so ``seed_everything`` makes a run repeatable as
before (though not bit-identical to ``nn.Dropout``'s masks). The keep probability is ``1 - p``
rounded to 1/256 (1/65536): exact for the 0.25 and 0.5 of the study; the kept values are scaled by
the reciprocal of the probability actually used, so the expectation is unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_INT64_RANGE = (-(2**63), 2**63 - 1)


def _levels(p: float) -> tuple[int, int]:
    """``(levels, dropped)``: a mask value is one of ``levels`` and is dropped below ``dropped``."""
    levels = 256 if float(p * 256).is_integer() else 65536
    return levels, round(p * levels)


def representable(p: float) -> bool:
    """Whether byte masks can drop with probability ``p`` (not 0 or 1 after rounding)."""
    levels, dropped = _levels(p)
    return 0 < dropped < levels


def random_keep_mask(like: torch.Tensor, p: float) -> tuple[torch.Tensor, float]:
    """A bool mask shaped and laid out like ``like`` (CPU), True with probability about ``1 - p``.

    Returns ``(mask, scale)`` with ``scale = 1 / P(keep)`` for the probability actually used.
    ``p`` must be :func:`representable`.
    """
    levels, dropped = _levels(p)
    if not 0 < dropped < levels:
        raise ValueError(f"p={p} rounds to {dropped}/{levels}; use torch's dropout for it")
    count = like.numel()
    width = 1 if levels == 256 else 2
    words = torch.empty((count * width + 7) // 8, dtype=torch.int64).random_(*_INT64_RANGE)
    if levels == 256:
        values, lowest = words.view(torch.uint8)[:count], 0
    else:
        values, lowest = words.view(torch.int16)[:count], -(2**15)
    # The mask is laid out like the activations, so applying it is one pass in memory order.
    if (
        like.dim() == 4
        and not like.is_contiguous()
        and like.is_contiguous(memory_format=torch.channels_last)
    ):
        n, c, h, w = like.shape
        values = values.view(n, h, w, c).permute(0, 3, 1, 2)
    else:
        values = values.view(like.shape)
    keep = values >= lowest + dropped
    return keep, levels / (levels - dropped)


class _MaskedScale(torch.autograd.Function):
    """``x * mask * scale`` forward and backward (the fused kernel of dropout's own backward)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:
        keep, scale = random_keep_mask(x, p)
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return torch.ops.aten.native_dropout_backward(x, keep, scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (keep,) = ctx.saved_tensors
        return torch.ops.aten.native_dropout_backward(grad, keep, ctx.scale), None


class ByteMaskDropout(nn.Dropout):
    """``nn.Dropout`` (same arguments, same state, an instance of it) with cheap CPU masks.

    Shapes: any ``(*)`` -> the same. In eval mode, or with ``p == 0``, the identity.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        # p within 2**-17 of 0 or 1 would round to never or always: torch's masks are exact there.
        if x.device.type != "cpu" or not representable(self.p) or x.numel() == 0:
            return F.dropout(x, self.p, True, self.inplace)
        return _MaskedScale.apply(x, self.p)
