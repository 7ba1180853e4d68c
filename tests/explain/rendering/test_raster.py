import numpy as np
import pytest
from captum.attr._utils.visualization import _normalize_attr

from pneumonia.explain.rendering.raster import (
    CAPTION_HEIGHT,
    LABEL_HEIGHT,
    TITLE_HEIGHT,
    attribution_grid_image,
    blend,
    heat_map,
    normalize,
    study_figure_image,
)
from pneumonia.explain.settings import SIGNS


def test_scaling_matches_captums_visualiser():
    attribution = np.random.default_rng(0).normal(size=(40, 40)) ** 3
    np.testing.assert_allclose(
        normalize(attribution, "all"), _normalize_attr(attribution, "all", 2), rtol=1e-5
    )


def test_colours_and_zero_maps():
    heat = heat_map(np.array([[1.0, -1.0, 0.0]]), "all")
    # Green (matplotlib's #008000) for, red against, white for zero.
    np.testing.assert_allclose(heat[0], [[0, 128 / 255, 0], [1, 0, 0], [1, 1, 1]], atol=0.01)
    assert (normalize(np.zeros((4, 4)), "all") == 0).all()


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
        heat = heat_map(attributions[i], "all")
        np.testing.assert_allclose(
            tile(0, i), np.repeat(images[i][..., None], 3, -1), atol=0.5 / 255
        )
        np.testing.assert_allclose(tile(1, i), heat, atol=0.5 / 255 + 1e-6)
        np.testing.assert_allclose(tile(2, i), blend(images[i], heat), atol=0.5 / 255 + 1e-6)
    # The title and each caption are written in dark text above their own column.
    assert grid[:TITLE_HEIGHT].min() < 64
    captions = [grid[TITLE_HEIGHT:top, i * 128 : (i + 1) * 128] for i in range(3)]
    assert [caption.min() < 64 for caption in captions] == [True, False, True]


@pytest.mark.parametrize("sign", SIGNS)
def test_each_signs_scaling_matches_captums_visualiser(sign):
    attribution = np.random.default_rng(1).normal(size=(40, 40)) ** 3
    np.testing.assert_allclose(
        normalize(attribution, sign), _normalize_attr(attribution, sign, 2), rtol=1e-5
    )


def _figure_tiles(figure: np.ndarray, columns: int, side: int, scale: int):
    """``tile(row, column)``: one panel of a study figure, shrunk back to ``side`` px (or whole)."""
    tile_side = side * scale
    assert figure.shape == (TITLE_HEIGHT + 2 * (LABEL_HEIGHT + tile_side), columns * tile_side, 3)

    def tile(row: int, column: int, whole: bool = False) -> np.ndarray:
        top = TITLE_HEIGHT + row * (LABEL_HEIGHT + tile_side) + LABEL_HEIGHT
        block = figure[top : top + tile_side, column * tile_side : (column + 1) * tile_side]
        return block if whole else block[::scale, ::scale].astype(float) / 255

    return tile


def test_the_study_figure_shows_every_sign_alone_and_blended():
    rng = np.random.default_rng(0)
    image, attribution = rng.random((64, 64)), rng.normal(size=(64, 64))
    figure = study_figure_image(image, attribution, "title")
    tile = _figure_tiles(figure, len(SIGNS) + 1, 64, scale=4)  # upscaled to 256 px panels
    close = {"atol": 0.5 / 255 + 1e-6}
    np.testing.assert_allclose(tile(0, 0), np.repeat(image[..., None], 3, -1), **close)
    assert (tile(1, 0) == 1).all()  # no panel below the X-ray
    for column, sign in enumerate(SIGNS, start=1):
        heat = heat_map(attribution, sign)
        np.testing.assert_allclose(tile(0, column), heat, **close)
        np.testing.assert_allclose(tile(1, column), blend(image, heat), **close)
    # Each panel draws its own sign: where the map is not positive, the positive panel shows the
    # colour of zero, and the negative panel where it is not negative.
    for column, sign, off in ((2, "positive", attribution <= 0), (3, "negative", attribution >= 0)):
        zero_colour = heat_map(np.zeros((1, 1)), sign)[0, 0]
        np.testing.assert_allclose(
            tile(0, column)[off], np.broadcast_to(zero_colour, (off.sum(), 3)), **close
        )
        assert not np.allclose(tile(0, column)[~off], zero_colour, atol=0.01)


@pytest.mark.parametrize(
    ("attribution", "empty_signs"),
    [
        (np.zeros((32, 32)), set(SIGNS)),
        (-np.ones((32, 32)), {"positive"}),
        (np.eye(32), {"negative"}),
    ],
)
def test_a_sign_without_attribution_shows_the_xray_with_a_note(attribution, empty_signs):
    image = np.full((32, 32), 0.5)
    figure = study_figure_image(image, attribution, "degenerate", signs=SIGNS)
    tile = _figure_tiles(figure, len(SIGNS) + 1, 32, scale=8)
    for column, sign in enumerate(SIGNS, start=1):
        for row in (0, 1):
            panel = tile(row, column, whole=True).astype(int)
            # The note: yellow text (anti-aliased) on a black box; no colour map is black.
            box = (panel == 0).all(axis=-1).any()
            text = ((panel[..., :2] > 200).all(axis=-1) & (panel[..., 2] < 80)).any()
            noted = box and text
            assert noted == (sign in empty_signs), (sign, row)


def test_a_map_with_nan_or_infinite_values_is_drawn_as_its_finite_part():
    # One NaN made the scale NaN and every panel black.
    attribution = np.random.default_rng(2).normal(size=(32, 32))
    broken = attribution.copy()
    broken[:3] = np.nan
    broken[5, 5] = np.inf
    finite = attribution.copy()
    finite[:3], finite[5, 5] = 0.0, 0.0
    for sign in SIGNS:
        np.testing.assert_array_equal(normalize(broken, sign), normalize(finite, sign))
