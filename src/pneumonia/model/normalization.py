"""Input normalisation: float images in [0, 1] -> the network's input, as modules of the model.

Why it is a module of the model and not a DataLoader transform: it runs on the model's device
(the GPU when training there) on whole batches, so it costs no DataLoader time; and it is stored as
a plain hyperparameter in the checkpoint, so evaluation, explanation and prediction repeat exactly
the normalisation the network was trained with.

Every class takes ``pixel_mean`` and ``pixel_std`` keyword arguments (the statistics of the
training pixels in [0, 1]) and has :meth:`set_statistics`, so the model can build and update any
of them the same way; classes that do not need the statistics keep and ignore them. Each maps float
``(B, C, H, W)`` in [0, 1] to a tensor of the same shape and dtype, differentiable with respect to
the input (Guided Grad-CAM back-propagates to the pixels).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pneumonia import is_whole_number
from pneumonia.model.registry import register

DEFAULT_PIXEL_MEAN = 0.5
DEFAULT_PIXEL_STD = 0.25
# Mean and standard deviation of a uniform distribution on [0, 1]: an equalised image's.
_UNIFORM_MEAN = 0.5
_UNIFORM_STD = 1.0 / math.sqrt(12.0)  # 0.2887


def _statistic(name: str, value: float | None, default: float, positive: bool) -> float:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return float(value)


class _Normalization(nn.Module):
    """Holds the training pixel statistics as plain floats (not buffers: hyperparameters)."""

    def __init__(self, pixel_mean: float | None = None, pixel_std: float | None = None) -> None:
        super().__init__()
        self.set_statistics(pixel_mean, pixel_std)

    def set_statistics(self, mean: float | None, std: float | None) -> None:
        """Set the training pixel mean and standard deviation (``None``: 0.5 and 0.25).

        Raises:
            ValueError: ``mean`` not finite, or ``std`` not finite and > 0.
        """
        self.pixel_mean = _statistic("pixel_mean", mean, DEFAULT_PIXEL_MEAN, positive=False)
        self.pixel_std = _statistic("pixel_std", std, DEFAULT_PIXEL_STD, positive=True)


@register("normalization")
class DatasetStandardization(_Normalization):
    """``(x - pixel_mean) / pixel_std`` with the training set's statistics (the default).

    ``pixel_mean`` and ``pixel_std`` default to 0.5 and 0.25 when ``None``; they are plain float
    attributes, updated with :meth:`set_statistics` once the training data is known.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.pixel_mean) / self.pixel_std

    def extra_repr(self) -> str:
        return f"pixel_mean={self.pixel_mean:g}, pixel_std={self.pixel_std:g}"


@register("normalization")
class PerImageStandardization(_Normalization):
    """Each image to zero mean and unit standard deviation over its own pixels.

    A brightness or contrast change of a whole image (``a * x + b``, ``a > 0``) cancels, so
    exposure differences between machines do not reach the network. A constant image becomes 0.
    Statistics are computed in float32. ``pixel_mean``/``pixel_std`` are accepted and ignored.

    Args:
        eps: added to the standard deviation, so flat images do not divide by zero. > 0.
    """

    def __init__(
        self, eps: float = 1e-6, pixel_mean: float | None = None, pixel_std: float | None = None
    ) -> None:
        super().__init__(pixel_mean, pixel_std)
        eps = _statistic("eps", eps, 1e-6, positive=True)
        if eps > 0.1:
            raise ValueError(f"eps must be at most 0.1 (intensities are in [0, 1]), got {eps!r}")
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = tuple(range(1, x.ndim))
        # Shifted by each image's first pixel before averaging: a flat image is then exactly 0,
        # not float32 rounding error of the mean divided by eps.
        xf = x.float()
        xf = xf - xf.flatten(1)[:, :1].reshape(-1, *([1] * (x.ndim - 1))).detach()
        centred = xf - xf.mean(dim=dims, keepdim=True)
        # eps inside the square root too: sqrt's gradient at 0 is infinite, and a flat image
        # (a blank or saturated X-ray) must not give NaN attributions.
        std = (centred.square().mean(dim=dims, keepdim=True) + self.eps**2).sqrt()
        return (centred / (std + self.eps)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"eps={self.eps:g}"


@register("normalization")
class HistogramEqualization(_Normalization):
    """Per-image histogram equalisation, then scaled to about zero mean and unit std.

    Each image's pixels are quantised into ``bins`` levels on [0, 1]; its histogram (``scatter_add``
    per image), cumulative histogram and a ``gather`` give every pixel the mid-rank of its level,
    ``(pixels below + half the pixels at the level) / pixels``, in (0, 1). That output is spread
    over the whole range whatever the contrast of the input, is monotone in the input, and has mean
    exactly 0.5; ``(y - 0.5) / 0.2887`` (the mean and std of a uniform distribution) then brings it
    to about zero mean and unit std. Batched, no loop over images; computed in float32 (float16 and
    bfloat16 inputs work, the output has the input's dtype), on CPU and CUDA (``scatter_add_`` is
    deterministic on CUDA when deterministic algorithms are requested).

    Gradient: equalisation is piecewise constant, so its true gradient is zero almost everywhere.
    The forward value is the equalised image but the backward pass is straight-through: the
    gradient is that of ``(x - 0.5) / 0.2887``, as if the equalisation were the identity on [0, 1]
    (``eq + (xs - xs.detach())``, the same as ``xs + (eq - xs).detach()`` but exact in the
    forward value), so saliency methods still get a gradient at the pixels.

    ``pixel_mean``/``pixel_std`` are accepted and ignored.

    Args:
        bins: number of grey levels of the histogram, in [2, 65536].
    """

    def __init__(
        self, bins: int = 256, pixel_mean: float | None = None, pixel_std: float | None = None
    ) -> None:
        super().__init__(pixel_mean, pixel_std)
        if not is_whole_number(bins) or not 2 <= bins <= 65536:
            raise ValueError(f"bins must be an integer in [2, 65536], got {bins!r}")
        self.bins = int(bins)

    def equalize(self, x: torch.Tensor) -> torch.Tensor:
        """The equalised images in (0, 1), float32, shape of ``x``; no gradient."""
        with torch.no_grad():
            xf = x.detach().float()
            flat = xf.reshape(xf.shape[0], -1)
            levels = (flat * self.bins).floor().clamp_(0, self.bins - 1).long()
            counts = torch.zeros(flat.shape[0], self.bins, device=x.device, dtype=torch.float32)
            counts.scatter_add_(1, levels, torch.ones_like(flat))
            below = counts.cumsum(dim=1) - counts  # pixels at lower levels
            mid_rank = (below + 0.5 * counts) / flat.shape[1]
            return mid_rank.gather(1, levels).reshape(xf.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 0 or x[0].numel() == 0:
            return x
        straight = (x.float() - _UNIFORM_MEAN) / _UNIFORM_STD
        equalized = (self.equalize(x) - _UNIFORM_MEAN) / _UNIFORM_STD
        # Straight-through, written so the forward value is exactly the equalised image
        # (``straight - straight.detach()`` is exactly 0, and carries the gradient).
        return (equalized + (straight - straight.detach())).to(x.dtype)

    def extra_repr(self) -> str:
        return f"bins={self.bins}"
