import numpy as np

from pneumonia.explain.figures import SIGNS, attribution_grid, close, describe, study_figure


def test_study_figure_has_every_sign_alone_and_blended(tmp_path):
    rng = np.random.default_rng(0)
    image, attribution = rng.random((40, 40)), rng.normal(size=(40, 40))
    fig = study_figure(image, attribution, "title")
    titles = [ax.get_title() for ax in fig.axes]
    for sign in SIGNS:
        assert sign.replace("_", " ") in titles and f"{sign.replace('_', ' ')}, blended" in titles
    fig.savefig(tmp_path / "f.png")
    close(fig)


def test_all_zero_and_one_signed_maps_are_drawn_not_raised(tmp_path):
    image = np.full((32, 32), 0.5)
    for attribution in (np.zeros((32, 32)), -np.ones((32, 32))):
        fig = study_figure(image, attribution, "degenerate")
        texts = [t.get_text() for ax in fig.axes for t in ax.texts]
        assert texts  # the panels Captum cannot normalise carry a note instead
        fig.savefig(tmp_path / "zero.png")
        close(fig)


def test_grid_titles_carry_label_and_probability():
    images = np.zeros((2, 32, 32))
    fig = attribution_grid(images, np.ones((2, 32, 32)), [0, None], [0.91, 0.2], "grid")
    titles = [ax.get_title() for ax in fig.axes[:1]] + [fig.axes[3].get_title()]
    assert "true NORMAL" in titles[0] and "p=0.91" in titles[0]
    assert describe(None, 0.2) == "pred NORMAL (p=0.20)"
    close(fig)
