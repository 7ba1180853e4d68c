import numpy as np

from pneumonia.explain.rendering.figures import (
    SIGNS,
    attribution_grid,
    close,
    describe,
    study_figure,
)


def _shown(ax) -> np.ndarray:
    """The array of the last image an axis shows (a blended panel draws the X-ray first)."""
    return np.asarray(ax.images[-1].get_array())


def test_study_figure_shows_every_sign_alone_and_blended(tmp_path):
    rng = np.random.default_rng(0)
    image, attribution = rng.random((40, 40)), rng.normal(size=(40, 40))
    fig = study_figure(image, attribution, "title")
    names = [sign.replace("_", " ") for sign in SIGNS]
    assert [ax.get_title() for ax in fig.axes] == [
        "X-ray",
        *names,
        "",
        *(f"{name}, blended" for name in names),
    ]
    np.testing.assert_array_equal(_shown(fig.axes[0]), image)
    # Each panel draws its own sign: the positive panel lights up where the map is positive, the
    # negative panel where it is negative, the absolute panel everywhere the map is not zero.
    by_title = {ax.get_title(): _shown(ax) for ax in fig.axes[1:] if ax.images}
    for suffix in ("", ", blended"):
        np.testing.assert_array_equal(by_title[f"positive{suffix}"] > 0, attribution > 0)
        np.testing.assert_array_equal(by_title[f"negative{suffix}"] > 0, attribution < 0)
        np.testing.assert_array_equal(by_title[f"absolute value{suffix}"] > 0, attribution != 0)
        np.testing.assert_array_equal(np.sign(by_title[f"all{suffix}"]), np.sign(attribution))
    fig.savefig(tmp_path / "f.png")
    close(fig)


def test_all_zero_and_one_signed_maps_are_drawn_not_raised(tmp_path):
    image = np.full((32, 32), 0.5)
    zero, positive = "all-zero map", "no positive\nattribution"
    negative = "no negative\nattribution"
    expected_notes = {
        # Captum cannot normalise any panel of an all-zero map...
        "zero": [[], [zero], [positive], [negative], [zero]] * 2,
        # ...nor the positive panels of an all-negative one, which still draws the others.
        "negative": [[], [], [positive], [], []] * 2,
    }
    for name, attribution in (("zero", np.zeros((32, 32))), ("negative", -np.ones((32, 32)))):
        fig = study_figure(image, attribution, "degenerate")
        assert [[t.get_text() for t in ax.texts] for ax in fig.axes] == expected_notes[name]
        fig.savefig(tmp_path / f"{name}.png")
        close(fig)


def test_grid_titles_carry_label_probability_and_the_decision_at_the_stored_threshold():
    images = np.zeros((2, 32, 32))
    fig = attribution_grid(images, np.ones((2, 32, 32)), [0, None], [0.91, 0.2], "grid", 0.15)
    assert [ax.get_title() for ax in fig.axes] == [
        "true NORMAL\npred PNEUMONIA (p=0.91)",
        "pred PNEUMONIA (p=0.20)",
        "signed",
        "signed",
        "overlay",
        "overlay",
    ]
    close(fig)


def test_describe_applies_the_threshold_to_the_probability_of_pneumonia():
    assert describe(1, 0.93, 0.5) == "true PNEUMONIA, pred PNEUMONIA (p=0.93)"
    assert describe(None, 0.2, 0.5) == "pred NORMAL (p=0.20)"
    assert describe(None, 0.45, 0.4398) == "pred PNEUMONIA (p=0.45)"
    assert describe(-1, 0.7, threshold=0.8) == "pred NORMAL (p=0.70)"  # -1: no known label
    assert describe(0, 0.8, threshold=0.8) == "true NORMAL, pred PNEUMONIA (p=0.80)"
