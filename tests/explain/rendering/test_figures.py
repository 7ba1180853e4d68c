import numpy as np
import pytest

from pneumonia.explain.rendering.figures import attribution_grid, close, describe


def test_all_zero_and_one_signed_maps_are_drawn_not_raised(tmp_path):
    # Captum refuses to normalise a map with nothing of the sign it draws; the sheet notes it.
    images = np.full((2, 32, 32), 0.5)
    maps = np.stack([np.zeros((32, 32)), -np.ones((32, 32))])
    fig = attribution_grid(images, maps, [0, 1], [0.2, 0.9], "degenerate", 0.5)
    notes = [[t.get_text() for t in ax.texts] for ax in fig.axes]
    assert notes == [[], [], ["all-zero map"], [], ["all-zero map"], []]
    fig.savefig(tmp_path / "sheet.png")
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


@pytest.mark.parametrize(
    "probability, threshold, expected",
    [(0.93, 0.5, "true NORMAL, pred PNEUMONIA (p=0.93)"),
     (0.4995, 0.5, "true NORMAL, pred NORMAL (p=0.499)"),  # 0.50 would read as a PNEUMONIA call
     (0.5, 0.5, "true NORMAL, pred PNEUMONIA (p=0.50)"),
     (0.3449, 0.345, "true NORMAL, pred NORMAL (p=0.34)"),
     (0.49999999, 0.5, "true NORMAL, pred NORMAL (p=0.49999999)")],
)  # fmt: skip
def test_the_caption_never_rounds_p_across_the_threshold(probability, threshold, expected):
    assert describe(0, probability, threshold) == expected
