"""Random augmentation of whole image batches, on the model's device.

Why it is a module of the model and not a DataLoader transform: it runs on the device the model
runs on (the GPU when training there) on a whole batch at once, fully vectorised, so it costs no
DataLoader worker time; and its settings are plain hyperparameters stored in the checkpoint, so a
run records exactly how it was trained. It acts only in training mode: in eval mode (validation,
test, evaluation, explanation, prediction) it is the identity.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pneumonia.model.registry import register


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return value


def _in_range(name: str, value: object, low: float, high: float, allowed: str) -> float:
    number = _number(name, value)
    if not low <= number <= high:
        raise ValueError(f"{name} must be in {allowed}, got {number:g}")
    return number


def _pair(
    name: str, value: object, low: float, high: float, allowed: str, positive: bool = False
) -> tuple[float, float]:
    """Two numbers ``(lo, hi)`` with ``lo <= hi``, both in ``allowed`` (``lo > 0`` if positive)."""
    if isinstance(value, str | bytes) or not isinstance(value, Sequence) or len(value) != 2:
        raise ValueError(f"{name} must be two numbers [min, max] in {allowed}, got {value!r}")
    lo = _number(f"{name}[0]", value[0])
    hi = _number(f"{name}[1]", value[1])
    if not (low <= lo <= hi <= high) or (positive and lo <= 0):
        raise ValueError(
            f"{name} must be two numbers [min, max] with min <= max, both in {allowed}, got "
            f"[{lo:g}, {hi:g}]"
        )
    return lo, hi


@register("augmentation")
class BatchAugmentation(nn.Module):
    """Per-sample random affine, flip, photometric changes, blur and noise of a batch.

    Every sample of the batch draws its own parameters; nothing loops over samples. Shapes:
    ``forward(x)`` takes float ``(B, C, H, W)`` (``C = 1`` for the X-rays) in [0, 1] on any device
    and returns a tensor of the same shape, dtype and device, clamped to [0, 1] (computed in
    float32, also under autocast). In eval mode, or when every lever is off, it returns ``x`` itself.

    Random numbers come from the global torch RNG of ``x.device`` (so ``lightning.seed_everything``
    makes runs reproducible), or from ``generator`` when ``forward`` gets one (it must live on
    ``x.device``).

    Order: affine (rotation, scale, translation; zero padding, i.e. black, the X-ray's "no
    signal"), horizontal flip, gamma, contrast, brightness, clamp, blur, noise, clamp.

    Each lever is off, and costs nothing, at its neutral amount (0, or ``[1, 1]`` for ``scale``,
    1 for ``gamma``, probability 0 for blur, noise and flip).

    Args:
        rotation: largest rotation in degrees; each sample turns by U(-rotation, rotation).
            In [0, 180].
        scale: ``[min, max]`` isotropic zoom factor, U(min, max) per sample (> 1 enlarges the
            content). ``0 < min <= max <= 10``.
        translate: largest shift as a fraction of the image side, per axis U(-t, t). In [0, 1].
        brightness: largest additive change of the intensities, U(-b, b). In [0, 1].
        contrast: contrast factor U(1 - c, 1 + c), applied around each image's own mean. In [0, 1].
        gamma: ``x ** g`` with ``g`` log-uniform in [1 / gamma, gamma]. In [1, 10]; 1 is off.
        blur_p: probability that a sample is Gaussian-blurred. In [0, 1].
        blur_sigma: ``[min, max]`` standard deviation of the blur, **in pixels** of the image
            the module sees (U(min, max) per sample; the kernel has ``2 * ceil(3 * max) + 1``
            taps, replicate padding). ``0 < min <= max <= 20``.
        noise_p: probability that a sample gets additive Gaussian noise. In [0, 1].
        noise_std: ``[min, max]`` standard deviation of that noise (intensities in [0, 1]),
            U(min, max) per sample. ``0 <= min <= max <= 1``.
        hflip_p: probability of a left-right mirror. Default 0: in a chest X-ray the heart is on
            the patient's left (the image's right), and a mirrored chest is anatomically wrong
            (situs inversus is rare), so a flip teaches the network images it never meets.
            In [0, 1].

    Raises:
        ValueError: an argument outside its range, naming the argument and the allowed range.
    """

    def __init__(
        self,
        rotation: float = 0.0,
        scale: Sequence[float] = (1.0, 1.0),
        translate: float = 0.0,
        brightness: float = 0.0,
        contrast: float = 0.0,
        gamma: float = 1.0,
        blur_p: float = 0.0,
        blur_sigma: Sequence[float] = (0.5, 1.0),
        noise_p: float = 0.0,
        noise_std: Sequence[float] = (0.0, 0.05),
        hflip_p: float = 0.0,
    ) -> None:
        super().__init__()
        self.rotation = _in_range("rotation", rotation, 0.0, 180.0, "[0, 180] degrees")
        self.scale = _pair("scale", scale, 0.1, 10.0, "[0.1, 10]", positive=True)
        self.translate = _in_range("translate", translate, 0.0, 1.0, "[0, 1] (fraction of side)")
        self.brightness = _in_range("brightness", brightness, 0.0, 1.0, "[0, 1]")
        self.contrast = _in_range("contrast", contrast, 0.0, 1.0, "[0, 1]")
        self.gamma = _in_range("gamma", gamma, 1.0, 10.0, "[1, 10] (1 is off)")
        self.blur_p = _in_range("blur_p", blur_p, 0.0, 1.0, "[0, 1]")
        self.blur_sigma = _pair(
            "blur_sigma", blur_sigma, 0.0, 20.0, "(0, 20] pixels", positive=True
        )
        self.noise_p = _in_range("noise_p", noise_p, 0.0, 1.0, "[0, 1]")
        self.noise_std = _pair("noise_std", noise_std, 0.0, 1.0, "[0, 1]")
        self.hflip_p = _in_range("hflip_p", hflip_p, 0.0, 1.0, "[0, 1]")
        self._blur_radius = math.ceil(3.0 * self.blur_sigma[1])

    # ----- which levers act -------------------------------------------------------------------
    @property
    def _affine_on(self) -> bool:
        return self.rotation > 0 or self.scale != (1.0, 1.0) or self.translate > 0

    @property
    def _noise_on(self) -> bool:
        return self.noise_p > 0 and self.noise_std[1] > 0

    @property
    def active(self) -> bool:
        """Whether any lever is on (if not, training mode is the identity too)."""
        return (
            self._affine_on or self.hflip_p > 0 or self.gamma > 1 or self.contrast > 0
            or self.brightness > 0 or self.blur_p > 0 or self._noise_on
        )  # fmt: skip

    def extra_repr(self) -> str:
        return (
            f"rotation={self.rotation:g}, scale={list(self.scale)}, translate={self.translate:g}, "
            f"brightness={self.brightness:g}, contrast={self.contrast:g}, gamma={self.gamma:g}, "
            f"blur_p={self.blur_p:g}, blur_sigma={list(self.blur_sigma)}, "
            f"noise_p={self.noise_p:g}, noise_std={list(self.noise_std)}, hflip_p={self.hflip_p:g}"
        )

    # ----- forward ----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Augment ``x`` (float ``(B, C, H, W)`` in [0, 1]) in training mode; identity otherwise."""
        if not self.training or not self.active:
            return x
        if x.ndim != 4 or not x.is_floating_point():
            raise ValueError(
                f"BatchAugmentation takes float (B, C, H, W) images, got {x.dtype} {tuple(x.shape)}"
            )
        batch = x.shape[0]
        device = x.device

        def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
            u = torch.rand((batch, *shape), device=device, generator=generator)
            return low + (high - low) * u

        def chance(p: float) -> torch.Tensor:  # (B, 1, 1, 1) bool
            return torch.rand((batch, 1, 1, 1), device=device, generator=generator) < p

        out = x.float()
        if self._affine_on:
            out = self._affine(out, uniform)
        if self.hflip_p > 0:
            out = torch.where(chance(self.hflip_p), out.flip(-1), out)
        if self.gamma > 1:
            log_gamma = math.log(self.gamma)
            g = torch.exp(uniform(-log_gamma, log_gamma, 1, 1, 1))
            out = out.clamp(0.0, 1.0).pow(g)
        if self.contrast > 0:
            mean = out.mean(dim=(1, 2, 3), keepdim=True)
            out = mean + uniform(1 - self.contrast, 1 + self.contrast, 1, 1, 1) * (out - mean)
        if self.brightness > 0:
            out = out + uniform(-self.brightness, self.brightness, 1, 1, 1)
        out = out.clamp(0.0, 1.0)
        if self.blur_p > 0:
            # Outside autocast: under mixed precision the blur's convolutions would run in 16 bits.
            with torch.autocast(device_type=device.type, enabled=False):
                blurred = self._blur(out, uniform(*self.blur_sigma))
            out = torch.where(chance(self.blur_p), blurred, out)
        if self._noise_on:
            std = uniform(*self.noise_std, 1, 1, 1) * chance(self.noise_p)
            noise = torch.randn(out.shape, device=device, generator=generator)
            out = (out + std * noise).clamp(0.0, 1.0)
        return out.to(x.dtype)

    def _affine(self, x: torch.Tensor, uniform) -> torch.Tensor:
        """Rotate, zoom and shift each sample (bilinear, zero padding, ``align_corners=False``)."""
        height, width = x.shape[-2:]
        angle = uniform(-self.rotation, self.rotation) * (math.pi / 180.0)
        zoom = uniform(*self.scale)
        shift = uniform(-self.translate, self.translate, 2) * 2.0  # normalised units: side = 2
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        # The grid maps output to input coordinates; rotating in pixels, not in the normalised
        # [-1, 1] square, keeps the aspect of non-square images.
        aspect = height / width
        theta = torch.stack(
            [
                torch.stack([cos, -sin * aspect, shift[:, 0]], dim=1),
                torch.stack([sin / aspect, cos, shift[:, 1]], dim=1),
            ],
            dim=1,
        )  # (B, 2, 3)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    def _blur(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Separable Gaussian blur with one ``sigma`` (pixels, shape ``(B,)``) per sample."""
        batch, channels, height, width = x.shape
        radius = self._blur_radius
        taps = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
        kernel = torch.exp(-0.5 * (taps[None, :] / sigma[:, None]) ** 2)
        kernel = kernel / kernel.sum(dim=1, keepdim=True)  # (B, K)
        kernel = kernel.repeat_interleave(channels, dim=0)  # one kernel per (sample, channel)
        groups = batch * channels
        y = x.reshape(1, groups, height, width)
        y = F.pad(y, (radius, radius, 0, 0), mode="replicate")
        y = F.conv2d(y, kernel[:, None, None, :], groups=groups)
        y = F.pad(y, (0, 0, radius, radius), mode="replicate")
        y = F.conv2d(y, kernel[:, None, :, None], groups=groups)
        return y.reshape(batch, channels, height, width)
