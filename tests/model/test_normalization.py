from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from pneumonia.model import registry
from pneumonia.model.normalization import (
    DatasetStandardization,
    HistogramEqualization,
    PerImageStandardization,
)

CONF = Path(__file__).resolve().parents[2] / "conf" / "normalization"
CLASSES = [DatasetStandardization, PerImageStandardization, HistogramEqualization]


def _images(n: int = 4, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(seed))


def _ramp(n: int = 1, size: int = 32, low: float = 0.45, high: float = 0.55) -> torch.Tensor:
    return torch.linspace(low, high, size * size).reshape(1, 1, size, size).repeat(n, 1, 1, 1)


# ----- dataset standardisation ------------------------------------------------------------------
def test_dataset_standardization_formula():
    x = _images()
    norm = DatasetStandardization(pixel_mean=0.4, pixel_std=0.2)
    torch.testing.assert_close(norm(x), (x - 0.4) / 0.2)


def test_dataset_standardization_defaults_and_update():
    norm = DatasetStandardization()
    assert (norm.pixel_mean, norm.pixel_std) == (0.5, 0.25)
    x = _images()
    torch.testing.assert_close(norm(x), (x - 0.5) / 0.25)
    norm.set_statistics(0.3, 0.1)
    assert isinstance(norm.pixel_mean, float) and isinstance(norm.pixel_std, float)
    torch.testing.assert_close(norm(x), (x - 0.3) / 0.1)
    assert norm.state_dict() == {}  # statistics are hyperparameters, not buffers


@pytest.mark.parametrize("std", [0.0, -0.1, float("nan"), float("inf")])
def test_dataset_standardization_refuses_a_bad_std(std):
    with pytest.raises(ValueError, match="pixel_std"):
        DatasetStandardization(pixel_mean=0.5, pixel_std=std)
    with pytest.raises(ValueError, match="pixel_std"):
        DatasetStandardization().set_statistics(0.5, std)


# ----- per-image standardisation ----------------------------------------------------------------
def test_per_image_has_zero_mean_and_unit_std():
    x = _images(6) * torch.linspace(0.2, 1.0, 6)[:, None, None, None]
    y = PerImageStandardization()(x)
    torch.testing.assert_close(y.mean(dim=(1, 2, 3)), torch.zeros(6), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.std(dim=(1, 2, 3), correction=0), torch.ones(6), atol=1e-4, rtol=0)


@pytest.mark.parametrize(("a", "b"), [(0.5, 0.2), (0.3, 0.0), (0.9, 0.05)])
def test_per_image_is_invariant_to_brightness_and_contrast(a, b):
    x = _images(3)
    assert float((a * x + b).max()) <= 1.0
    norm = PerImageStandardization()
    torch.testing.assert_close(norm(a * x + b), norm(x), atol=1e-4, rtol=0)


def test_per_image_flat_image_is_zero_not_nan():
    y = PerImageStandardization()(torch.full((2, 1, 8, 8), 0.7))
    assert torch.isfinite(y).all() and float(y.abs().max()) < 1e-3


def test_per_image_ignores_dataset_statistics():
    x = _images()
    torch.testing.assert_close(
        PerImageStandardization(pixel_mean=0.1, pixel_std=0.9)(x), PerImageStandardization()(x)
    )


def test_per_image_refuses_bad_eps():
    with pytest.raises(ValueError, match="eps"):
        PerImageStandardization(eps=0.0)


# ----- histogram equalisation -------------------------------------------------------------------
def _reference_equalization(image: np.ndarray, bins: int = 256) -> np.ndarray:
    """Mid-rank of each pixel's grey level, one image at a time, in numpy."""
    levels = np.clip(np.floor(image.astype(np.float64) * bins), 0, bins - 1).astype(int).ravel()
    counts = np.bincount(levels, minlength=bins).astype(np.float64)
    below = np.cumsum(counts) - counts
    return ((below + 0.5 * counts)[levels] / levels.size).reshape(image.shape)


def test_equalization_spreads_a_low_contrast_ramp_to_the_full_range():
    x = _ramp(1, low=0.45, high=0.55)
    y = HistogramEqualization()(x)
    assert float(x.max() - x.min()) < 0.11
    # uniform on [0, 1] scaled by (y - 0.5) / 0.2887 spans about [-1.73, 1.73]
    assert float(y.min()) < -1.6 and float(y.max()) > 1.6
    assert abs(float(y.mean())) < 1e-5 and abs(float(y.std(correction=0)) - 1.0) < 0.05


def test_equalization_is_monotone_in_the_input():
    x = _images(1, size=48)
    y = HistogramEqualization()(x)
    order = torch.argsort(x.flatten())
    assert (torch.diff(y.flatten()[order]) >= 0).all()
    # pixels in different grey levels stay strictly ordered
    levels = (x.flatten()[order] * 256).floor()
    steps = torch.diff(levels) > 0
    assert (torch.diff(y.flatten()[order])[steps] > 0).all()


def test_equalization_matches_a_per_image_reference():
    x = torch.cat([_images(2, size=24), _ramp(1, size=24, low=0.1, high=0.3)])
    x[1] = x[1] ** 3  # a skewed histogram
    eq = HistogramEqualization().equalize(x)
    for i in range(x.shape[0]):
        expected = _reference_equalization(x[i].numpy())
        np.testing.assert_allclose(eq[i].numpy(), expected, atol=1e-6)


def test_equalization_treats_images_independently():
    a, b = _images(1, seed=1), _ramp(1) ** 2
    norm = HistogramEqualization()
    together = norm(torch.cat([a, b]))
    torch.testing.assert_close(together, torch.cat([norm(a), norm(b)]))


def test_equalization_gradient_is_straight_through():
    x = _ramp(2).requires_grad_(True)
    y = HistogramEqualization()(x)
    (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and bool((x.grad != 0).any())
    expected = torch.linspace(-1, 1, y.numel()).reshape(y.shape) / (1 / 12**0.5)
    torch.testing.assert_close(x.grad, expected, rtol=1e-4, atol=1e-4)


def test_equalization_flat_image_is_zero():
    y = HistogramEqualization()(torch.full((1, 1, 8, 8), 0.3))
    torch.testing.assert_close(y, torch.zeros_like(y))


def test_equalization_bins_are_checked():
    assert HistogramEqualization(bins=16).bins == 16
    for bad in (1, 0, 2.5, True, 10**6):
        with pytest.raises(ValueError, match="bins"):
            HistogramEqualization(bins=bad)


# ----- all classes ------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_work(cls, dtype):
    x = _images(2)
    y = cls()(x.to(dtype))
    assert y.dtype == dtype and y.shape == x.shape and torch.isfinite(y).all()
    reference = cls()(x.to(dtype).float())
    torch.testing.assert_close(y.float(), reference, atol=0.05, rtol=0.02)


@pytest.mark.parametrize("cls", CLASSES)
def test_gradient_reaches_the_pixels(cls):
    x = _images(2).requires_grad_(True)
    y = cls()(x)
    (y * torch.randn(y.shape, generator=torch.Generator().manual_seed(0))).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and bool((x.grad != 0).any())


@pytest.mark.parametrize("cls", CLASSES)
def test_every_class_accepts_the_statistics(cls):
    norm = cls(pixel_mean=0.4, pixel_std=0.2)
    assert (norm.pixel_mean, norm.pixel_std) == (0.4, 0.2)
    norm.set_statistics(0.3, 0.1)
    assert (norm.pixel_mean, norm.pixel_std) == (0.3, 0.1)
    assert norm.state_dict() == {}


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("dataset", DatasetStandardization),
        ("per_image", PerImageStandardization),
        ("histogram_equalization", HistogramEqualization),
    ],
)
def test_presets_build_through_the_registry(name, cls):
    node = OmegaConf.to_container(OmegaConf.load(CONF / f"{name}.yaml"))
    norm = registry.build("normalization", node, pixel_mean=0.4, pixel_std=0.2)
    assert type(norm) is cls
    assert (norm.pixel_mean, norm.pixel_std) == (0.4, 0.2)
    assert norm(_images()).shape == _images().shape


def test_dataset_preset_uses_the_statistics():
    node = OmegaConf.to_container(OmegaConf.load(CONF / "dataset.yaml"))
    norm = registry.build("normalization", node, pixel_mean=0.4, pixel_std=0.2)
    x = _images()
    torch.testing.assert_close(norm(x), (x - 0.4) / 0.2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("cls", CLASSES)
def test_cuda_matches_cpu(cls):
    x = _images(3)
    torch.testing.assert_close(cls()(x.cuda()).cpu(), cls()(x), atol=1e-5, rtol=1e-5)
    assert cls()(x.cuda().bfloat16()).dtype == torch.bfloat16


def test_per_image_standardisation_keeps_gradients_finite_on_flat_images():
    from pneumonia.model.normalization import PerImageStandardization

    images = torch.stack([torch.zeros(1, 8, 8), torch.full((1, 8, 8), 0.5)]).requires_grad_()
    PerImageStandardization()(images).square().sum().backward()
    assert torch.isfinite(images.grad).all()
