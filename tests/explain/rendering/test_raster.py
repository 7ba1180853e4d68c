import numpy as np
from captum.attr._utils.visualization import _normalize_attr

from pneumonia.explain.rendering.raster import (
    CAPTION_HEIGHT,
    TITLE_HEIGHT,
    attribution_grid_image,
    blend,
    normalize_signed,
    signed_heat_map,
)


def test_scaling_matches_captums_visualiser():
    attribution = np.random.default_rng(0).normal(size=(40, 40)) ** 3
    np.testing.assert_allclose(
        normalize_signed(attribution), _normalize_attr(attribution, "all", 2), rtol=1e-5
    )


def test_colours_and_zero_maps():
    heat = signed_heat_map(np.array([[1.0, -1.0, 0.0]]))
    # Green (matplotlib's #008000) for, red against, white for zero.
    np.testing.assert_allclose(heat[0], [[0, 128 / 255, 0], [1, 0, 0], [1, 1, 1]], atol=0.01)
    assert (normalize_signed(np.zeros((4, 4))) == 0).all()


def test_grid_layout_upscales_small_images():
    rng = np.random.default_rng(0)
    images = rng.random((3, 64, 64))
    attributions = rng.normal(size=(3, 64, 64))
    grid = attribution_grid_image(images, attributions, ["a", "", "c"], "title")
    top = TITLE_HEIGHT + CAPTION_HEIGHT
    assert grid.dtype == np.uint8 and grid.shape == (top + 3 * 128, 3 * 128, 3)

    def tile(row: int, column: int) -> np.ndarray:
        """One 128 px tile, shrunk back to 64 px (each pixel was repeated 2x2)."""
        block = grid[top + row * 128 : top + (row + 1) * 128, column * 128 : (column + 1) * 128]
        assert (block[::2, ::2] == block[1::2, 1::2]).all()
        return block[::2, ::2].astype(float) / 255

    for i in range(3):
        heat = signed_heat_map(attributions[i])
        np.testing.assert_allclose(
            tile(0, i), np.repeat(images[i][..., None], 3, -1), atol=0.5 / 255
        )
        np.testing.assert_allclose(tile(1, i), heat, atol=0.5 / 255 + 1e-6)
        np.testing.assert_allclose(tile(2, i), blend(images[i], heat), atol=0.5 / 255 + 1e-6)
    # The title and each caption are written in dark text above their own column.
    assert grid[:TITLE_HEIGHT].min() < 64
    captions = [grid[TITLE_HEIGHT:top, i * 128 : (i + 1) * 128] for i in range(3)]
    assert [caption.min() < 64 for caption in captions] == [True, False, True]
