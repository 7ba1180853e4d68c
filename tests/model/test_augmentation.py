import math
from pathlib import Path

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf

from pneumonia.model import registry
from pneumonia.model.augmentation import BatchAugmentation

CONF = Path(__file__).resolve().parents[2] / "conf" / "augmentation"
STRONG = {
    "rotation": 15.0,
    "scale": [0.85, 1.15],
    "translate": 0.08,
    "brightness": 0.15,
    "contrast": 0.3,
    "gamma": 1.4,
    "blur_p": 0.3,
    "blur_sigma": [0.1, 1.2],
    "noise_p": 0.3,
    "noise_std": [0.0, 0.04],
}


def _training(**kwargs) -> BatchAugmentation:
    return BatchAugmentation(**kwargs).train()


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _images(n: int = 8, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, size, size, generator=_generator(seed))


def _bar(n: int, size: int = 65, half_width: int = 1) -> torch.Tensor:
    """A bright horizontal bar through the centre, from edge to edge but for a margin."""
    x = torch.zeros(n, 1, size, size)
    mid = size // 2
    x[:, :, mid - half_width : mid + half_width + 1, 12:-12] = 1.0
    return x


def _ramp(n: int, size: int = 32, low: float = 0.25, high: float = 0.75) -> torch.Tensor:
    return torch.linspace(low, high, size * size).reshape(1, 1, size, size).repeat(n, 1, 1, 1)


def _orientation_degrees(x: torch.Tensor) -> torch.Tensor:
    """Principal-axis angle of each image's intensity (second moments), in degrees."""
    size = x.shape[-1]
    coords = torch.arange(size, dtype=torch.float32)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    w = x[:, 0]
    mass = w.sum(dim=(1, 2))
    cy = (w * yy).sum(dim=(1, 2)) / mass
    cx = (w * xx).sum(dim=(1, 2)) / mass
    dy, dx = yy - cy[:, None, None], xx - cx[:, None, None]
    mu20 = (w * dx * dx).sum(dim=(1, 2))
    mu02 = (w * dy * dy).sum(dim=(1, 2))
    mu11 = (w * dx * dy).sum(dim=(1, 2))
    return torch.rad2deg(0.5 * torch.atan2(2 * mu11, mu20 - mu02))


def _inertia(x: torch.Tensor) -> torch.Tensor:
    """Each image's polar second moment about its centroid, mu20 + mu02 (rotation-invariant)."""
    height, width = x.shape[-2:]
    yy, xx = torch.meshgrid(
        torch.arange(height, dtype=torch.float32),
        torch.arange(width, dtype=torch.float32),
        indexing="ij",
    )
    w = x[:, 0]
    mass = w.sum(dim=(1, 2))
    cy = (w * yy).sum(dim=(1, 2)) / mass
    cx = (w * xx).sum(dim=(1, 2)) / mass
    r2 = (yy - cy[:, None, None]) ** 2 + (xx - cx[:, None, None]) ** 2
    return (w * r2).sum(dim=(1, 2))


def _centroid(x: torch.Tensor) -> torch.Tensor:
    size = x.shape[-1]
    coords = torch.arange(size, dtype=torch.float32)
    w = x[:, 0]
    mass = w.sum(dim=(1, 2))
    cy = (w.sum(dim=2) * coords).sum(dim=1) / mass
    cx = (w.sum(dim=1) * coords).sum(dim=1) / mass
    return torch.stack([cx, cy], dim=1)


# ----- modes, shapes, dtypes --------------------------------------------------------------------
def test_eval_mode_is_the_identity():
    augment = BatchAugmentation(**STRONG, hflip_p=0.5).eval()
    x = _images()
    y = augment(x)
    assert torch.equal(y, x)


def test_training_mode_changes_images_and_keeps_range_shape_dtype():
    augment = _training(**STRONG)
    x = _images(16)
    y = augment(x, generator=_generator())
    assert y.shape == x.shape and y.dtype == x.dtype and y.device == x.device
    assert not torch.allclose(y, x)
    assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_float_dtypes_are_kept(dtype):
    x = _images(4).to(dtype)
    y = _training(**STRONG)(x)
    assert y.dtype == dtype and y.shape == x.shape
    assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0


def test_all_levers_off_is_the_identity_in_training_mode():
    augment = _training(
        rotation=0, scale=[1, 1], translate=0, brightness=0, contrast=0, gamma=1, blur_p=0,
        noise_p=0, hflip_p=0,
    )  # fmt: skip
    assert not augment.active
    x = _images()
    assert torch.equal(augment(x), x)
    assert torch.equal(_training()(x), x)  # the defaults are all off


def test_noise_with_zero_std_is_off():
    augment = _training(noise_p=1.0, noise_std=[0.0, 0.0])
    x = _images()
    assert not augment.active and torch.equal(augment(x), x)


def test_each_sample_draws_its_own_parameters():
    x = _images(1).repeat(8, 1, 1, 1)
    y = _training(**STRONG)(x, generator=_generator())
    flat = y.flatten(1)
    distinct = {tuple(row.tolist()) for row in flat}
    assert len(distinct) == 8


# ----- randomness -------------------------------------------------------------------------------
def test_same_seed_same_output_different_seed_different_output():
    augment = _training(**STRONG, hflip_p=0.5)
    x = _images(8)
    torch.manual_seed(3)
    first = augment(x)
    torch.manual_seed(3)
    again = augment(x)
    torch.manual_seed(4)
    other = augment(x)
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)


def test_seed_everything_makes_it_reproducible(monkeypatch):
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)  # restored afterwards
    augment = _training(**STRONG)
    x = _images(8)
    L.seed_everything(11, verbose=False)
    first = augment(x)
    L.seed_everything(11, verbose=False)
    assert torch.equal(augment(x), first)


def test_generator_argument_is_used():
    augment = _training(**STRONG)
    x = _images(8)
    torch.manual_seed(0)
    a = augment(x, generator=_generator(5))
    torch.manual_seed(1)  # the global RNG does not matter when a generator is given
    b = augment(x, generator=_generator(5))
    c = augment(x, generator=_generator(6))
    assert torch.equal(a, b) and not torch.allclose(a, c)


# ----- each lever alone -------------------------------------------------------------------------
def test_rotation_turns_the_bar_by_angles_within_the_range():
    x = _bar(64)
    y = _training(rotation=60.0)(x, generator=_generator())
    angles = _orientation_degrees(y)
    assert float(_orientation_degrees(x).abs().max()) < 1e-3  # horizontal before
    assert float(angles.abs().max()) <= 61.0
    assert float(angles.abs().max()) > 40.0  # U(-60, 60): some are turned a lot
    assert (angles > 5).any() and (angles < -5).any()  # both ways
    # The bar turns about the centre and leaves its original rows.
    centre = (x.shape[-1] - 1) / 2
    torch.testing.assert_close(_centroid(y), torch.full((64, 2), centre), atol=0.5, rtol=0)
    # A rotation keeps the bar's area and length: mass and inertia (mu20 + mu02) do not change.
    torch.testing.assert_close(y.sum(dim=(1, 2, 3)), x.sum(dim=(1, 2, 3)), rtol=0.02, atol=0)
    torch.testing.assert_close(_inertia(y), _inertia(x), rtol=0.03, atol=0)
    turned = angles.abs() > 20
    mid = x.shape[-1] // 2
    in_bar_rows = y[:, 0, mid - 1 : mid + 2].sum(dim=(1, 2)) / y.sum(dim=(1, 2, 3))
    assert (in_bar_rows[turned] < 0.6).all()


def test_rotation_of_a_non_square_image_keeps_shapes():
    x = torch.zeros(32, 1, 48, 96)
    x[:, :, 16:32, 40:56] = 1.0  # a centred 16x16 square
    y = _training(rotation=90.0)(x, generator=_generator())
    torch.testing.assert_close(y.sum(dim=(1, 2, 3)), x.sum(dim=(1, 2, 3)), rtol=0.02, atol=0)
    torch.testing.assert_close(_inertia(y), _inertia(x), rtol=0.03, atol=0)
    # A square turned by a: its width grows by |cos a| + |sin a|, not stretched along one axis.
    rows_hit = (y[:, 0] > 0.5).any(dim=2).sum(dim=1).float()
    cols_hit = (y[:, 0] > 0.5).any(dim=1).sum(dim=1).float()
    torch.testing.assert_close(rows_hit, cols_hit, atol=2.0, rtol=0)


def test_scale_zooms_about_the_centre():
    x = torch.zeros(2, 1, 64, 64)
    x[:, :, 24:40, 24:40] = 1.0  # a 16x16 square, area 256
    bigger = _training(scale=[1.5, 1.5])(x)
    smaller = _training(scale=[0.5, 0.5])(x)
    assert float(bigger.sum(dim=(1, 2, 3)).mean()) == pytest.approx(256 * 1.5**2, rel=0.03)
    assert float(smaller.sum(dim=(1, 2, 3)).mean()) == pytest.approx(256 * 0.5**2, rel=0.03)
    torch.testing.assert_close(_centroid(bigger), torch.full((2, 2), 31.5), atol=0.05, rtol=0)


def test_translation_shifts_within_a_fraction_of_the_side():
    x = torch.zeros(64, 1, 64, 64)
    x[:, :, 28:36, 28:36] = 1.0
    y = _training(translate=0.25)(x, generator=_generator())
    shift = _centroid(y) - 31.5
    assert float(shift.abs().max()) <= 0.25 * 64 + 0.5
    assert float(shift.abs().max()) > 0.15 * 64
    assert (shift[:, 0] > 2).any() and (shift[:, 0] < -2).any()
    assert (shift[:, 1] > 2).any() and (shift[:, 1] < -2).any()
    # Mass is kept while the square stays inside the image.
    torch.testing.assert_close(y.sum(dim=(1, 2, 3)), x.sum(dim=(1, 2, 3)), rtol=1e-4, atol=1e-2)


def test_affine_pads_with_black():
    x = torch.ones(8, 1, 32, 32)
    y = _training(rotation=45.0, scale=[0.7, 0.7])(x)
    assert float(y[:, :, 0, 0].max()) == 0.0  # corners leave the shrunken, turned white image


def test_brightness_shifts_each_image_uniformly_within_the_range():
    x = torch.full((64, 1, 16, 16), 0.5)
    y = _training(brightness=0.2)(x, generator=_generator())
    shift = (y - x).flatten(1)
    per_image = shift[:, 0]
    torch.testing.assert_close(shift, per_image[:, None].expand_as(shift))  # uniform in an image
    assert float(per_image.abs().max()) <= 0.2 + 1e-6
    assert (per_image > 0.05).any() and (per_image < -0.05).any()  # raises and lowers the mean


def test_brightness_raises_the_mean_when_it_draws_a_positive_shift():
    x = torch.full((64, 1, 16, 16), 0.5)
    y = _training(brightness=0.2)(x, generator=_generator())
    brighter = y.mean(dim=(1, 2, 3)) > x.mean(dim=(1, 2, 3))
    assert 10 < int(brighter.sum()) < 54


def test_contrast_scales_the_spread_around_each_mean():
    x = _ramp(64, low=0.1, high=0.5)  # mean 0.3: the centre is each image's mean, not 0.5
    y = _training(contrast=0.5)(x, generator=_generator())
    torch.testing.assert_close(y.mean(dim=(1, 2, 3)), x.mean(dim=(1, 2, 3)), atol=1e-5, rtol=0)
    ratio = y.std(dim=(1, 2, 3)) / x.std(dim=(1, 2, 3))
    assert float(ratio.min()) >= 0.5 - 1e-4 and float(ratio.max()) <= 1.5 + 1e-4
    assert float(ratio.min()) < 0.8 and float(ratio.max()) > 1.2


def test_gamma_is_a_power_law_with_exponent_in_range():
    x = _ramp(256, low=0.1, high=0.9)
    y = _training(gamma=2.0)(x, generator=_generator())
    exponent = torch.log(y) / torch.log(x)  # x ** g: the same g for every pixel of an image
    per_image = exponent.flatten(1)[:, 0]
    torch.testing.assert_close(
        exponent.flatten(1), per_image[:, None].expand_as(exponent.flatten(1)), atol=1e-3, rtol=0
    )
    assert float(per_image.min()) >= 0.5 - 1e-4 and float(per_image.max()) <= 2.0 + 1e-4
    assert (per_image < 0.8).any() and (per_image > 1.25).any()
    # log-uniform: log g is uniform on [-log 2, log 2], as many exponents below 1 as above
    assert 100 < int((per_image > 1).sum()) < 156
    assert abs(float(torch.log(per_image).mean())) < 0.08


def test_blur_spreads_an_impulse_keeps_its_mass_with_per_sample_sigma():
    x = torch.zeros(16, 1, 33, 33)
    x[:, :, 16, 16] = 1.0
    y = _training(blur_p=1.0, blur_sigma=[0.5, 2.0])(x, generator=_generator())
    torch.testing.assert_close(y.sum(dim=(1, 2, 3)), torch.ones(16), atol=1e-5, rtol=0)
    peaks = y[:, 0, 16, 16]
    assert float(peaks.max()) < 1.0  # every image blurred
    assert float(peaks.max() - peaks.min()) > 0.05  # with different sigmas
    # A symmetric Gaussian: the response is the same left/right and up/down.
    torch.testing.assert_close(y, y.flip(-1), atol=1e-6, rtol=0)
    torch.testing.assert_close(y, y.flip(-2), atol=1e-6, rtol=0)
    # Its spread (variance along x) matches sigma^2 within the drawn range.
    coords = torch.arange(33, dtype=torch.float32) - 16
    variance = (y[:, 0].sum(dim=1) * coords**2).sum(dim=1)
    assert float(variance.min()) >= 0.5**2 - 0.05 and float(variance.max()) <= 2.0**2 + 0.05


def test_blur_probability_leaves_some_samples_sharp():
    x = _images(32)
    y = _training(blur_p=0.5, blur_sigma=[1.0, 1.0])(x, generator=_generator())
    unchanged = (y == x).flatten(1).all(dim=1)
    assert 4 < int(unchanged.sum()) < 28
    assert (y[~unchanged].var(dim=(1, 2, 3)) < x[~unchanged].var(dim=(1, 2, 3))).all()


def test_noise_raises_the_variance():
    x = torch.full((16, 1, 64, 64), 0.5)
    y = _training(noise_p=1.0, noise_std=[0.05, 0.05])(x, generator=_generator())
    std = y.std(dim=(1, 2, 3))
    torch.testing.assert_close(std, torch.full((16,), 0.05), atol=0.005, rtol=0)
    torch.testing.assert_close(y.mean(dim=(1, 2, 3)), torch.full((16,), 0.5), atol=0.005, rtol=0)


def test_noise_probability_leaves_some_samples_clean():
    x = torch.full((32, 1, 16, 16), 0.5)
    y = _training(noise_p=0.5, noise_std=[0.05, 0.1])(x, generator=_generator())
    clean = (y == x).flatten(1).all(dim=1)
    assert 4 < int(clean.sum()) < 28


def test_flip_mirrors_left_and_right():
    x = _images(8)
    torch.testing.assert_close(_training(hflip_p=1.0)(x), x.flip(-1), atol=0, rtol=0)
    y = _training(hflip_p=0.5)(_images(1).repeat(32, 1, 1, 1), generator=_generator())
    flipped = (y == _images(1).flip(-1)).flatten(1).all(dim=1)
    kept = (y == _images(1)).flatten(1).all(dim=1)
    assert bool((flipped | kept).all()) and 4 < int(flipped.sum()) < 28


def test_no_flip_by_default():
    assert BatchAugmentation(**STRONG).hflip_p == 0.0


# ----- arguments --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"rotation": -1}, "rotation"),
        ({"rotation": 181}, "rotation"),
        ({"rotation": float("nan")}, "rotation"),
        ({"rotation": True}, "rotation"),
        ({"scale": [1.1, 0.9]}, "scale"),
        ({"scale": [0.0, 1.0]}, "scale"),
        ({"scale": [1.0]}, "scale"),
        ({"scale": 1.0}, "scale"),
        ({"scale": "ab"}, "scale"),
        ({"translate": 1.5}, "translate"),
        ({"brightness": -0.1}, "brightness"),
        ({"contrast": 1.5}, "contrast"),
        ({"gamma": 0.5}, "gamma"),
        ({"blur_p": 1.5}, "blur_p"),
        ({"blur_sigma": [0.0, 1.0]}, "blur_sigma"),
        ({"blur_sigma": [2.0, 1.0]}, "blur_sigma"),
        ({"noise_p": -0.5}, "noise_p"),
        ({"noise_std": [-0.1, 0.1]}, "noise_std"),
        ({"noise_std": [0.1, 2.0]}, "noise_std"),
        ({"hflip_p": 2}, "hflip_p"),
        ({"rotation": "5"}, "rotation"),
    ],
)
def test_invalid_arguments_raise_naming_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=rf"^{name}"):
        BatchAugmentation(**kwargs)


def test_out_of_range_message_names_the_allowed_range():
    with pytest.raises(ValueError, match=r"rotation must be in \[0, 180\]"):
        BatchAugmentation(rotation=200)


def test_no_state_in_the_state_dict():
    """Settings are hyperparameters of the checkpoint, not weights."""
    assert BatchAugmentation(**STRONG).state_dict() == {}


# ----- presets ----------------------------------------------------------------------------------
def _preset(name: str):
    return OmegaConf.to_container(OmegaConf.load(CONF / f"{name}.yaml"))


def test_none_preset_is_empty():
    node = _preset("none")
    assert not node  # empty: "no augmentation"
    registry.check("augmentation", node)


@pytest.mark.parametrize("name", ["light", "strong"])
def test_presets_build_through_the_registry(name):
    augment = registry.build("augmentation", _preset(name))
    assert isinstance(augment, BatchAugmentation) and augment.active
    assert augment.hflip_p == 0.0
    x = _images(4, size=128)
    y = augment.train()(x)
    assert y.shape == x.shape and not torch.allclose(y, x)
    assert torch.equal(augment.eval()(x), x)


def test_preset_values():
    light = registry.build("augmentation", _preset("light"))
    strong = registry.build("augmentation", _preset("strong"))
    assert (light.rotation, light.scale, light.translate) == (5.0, (0.95, 1.05), 0.03)
    assert (light.brightness, light.contrast, light.gamma) == (0.05, 0.1, 1.1)
    assert light.blur_p == 0 and light.noise_p == 0
    assert (strong.rotation, strong.scale, strong.translate) == (15.0, (0.85, 1.15), 0.08)
    assert (strong.brightness, strong.contrast, strong.gamma) == (0.15, 0.3, 1.4)
    assert (strong.blur_p, strong.blur_sigma) == (0.3, (0.1, 1.2))
    assert (strong.noise_p, strong.noise_std) == (0.3, (0.0, 0.04))
    assert math.isclose(strong.gamma, 1.4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_cuda_with_the_device_rng():
    augment = _training(**STRONG, hflip_p=0.5)
    x = _images(8).cuda()
    torch.manual_seed(0)
    y = augment(x)
    torch.manual_seed(0)
    assert y.device == x.device and torch.equal(augment(x), y)
    assert augment(x, generator=torch.Generator(device="cuda").manual_seed(1)).is_cuda
