import numpy as np
from captum.attr._utils.visualization import _normalize_attr

from pneumonia.explain.raster import attribution_grid_image, normalize_signed, signed_heat_map


def test_scaling_matches_captums_visualiser():
    attribution = np.random.default_rng(0).normal(size=(40, 40)) ** 3
    np.testing.assert_allclose(
        normalize_signed(attribution), _normalize_attr(attribution, "all", 2), rtol=1e-5
    )


def test_colours_and_zero_maps():
    heat = signed_heat_map(np.array([[1.0, -1.0, 0.0]]))
    np.testing.assert_allclose(heat[0, 2], [1, 1, 1], atol=0.01)  # zero is white
    assert heat[0, 0, 1] > heat[0, 0, 0] and heat[0, 1, 0] > heat[0, 1, 1]  # green for, red against
    assert (normalize_signed(np.zeros((4, 4))) == 0).all()


def test_grid_layout_upscales_small_images():
    images = np.zeros((3, 64, 64))
    grid = attribution_grid_image(images, np.ones((3, 64, 64)), ["a", "b", "c"], "title")
    assert grid.dtype == np.uint8 and grid.shape[1] == 3 * 128 and grid.shape[2] == 3
    assert grid.shape[0] > 3 * 128
