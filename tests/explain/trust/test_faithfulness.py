"""Deletion metric on a linear class model whose evidence pixels are known exactly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pneumonia.explain.trust.faithfulness import (
    deletion_auc,
    deletion_curve,
    eval_mode,
    random_deletion_auc,
)

SIDE = 32
EVIDENCE = 32  # pixels that carry all of the PNEUMONIA evidence
BIAS = -6.0


class LinearClassModel(nn.Module):
    """PNEUMONIA score ``sum(weights * x) + bias``, NORMAL score its negation: ``(B, 2)``."""

    def __init__(self, weights: torch.Tensor, bias: float) -> None:
        super().__init__()
        self.register_buffer("weights", weights)
        self.bias = bias
        self.modes_seen: list[bool] = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.modes_seen.append(self.training)
        score = (images * self.weights).sum(dim=(1, 2, 3)) + self.bias
        return torch.stack([-score, score], dim=1)


@pytest.fixture
def setup() -> tuple[LinearClassModel, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    weights = torch.zeros(1, 1, SIDE, SIDE)
    weights.view(-1)[torch.randperm(SIDE * SIDE, generator=generator)[:EVIDENCE]] = 1.0
    # Bright evidence pixels: the model starts near certain (score about 18) and, with the evidence
    # gone, ends at sigmoid(BIAS), near 0.
    images = 0.5 + 0.5 * torch.rand(4, 1, SIDE, SIDE, generator=generator)
    return LinearClassModel(weights, BIAS), images, torch.ones(4, dtype=torch.long)


def test_true_attribution_beats_random_and_reversed_order(setup) -> None:
    model, images, targets = setup
    truth = model.weights * images
    faithful = deletion_auc(model, images, targets, truth)
    reversed_order = deletion_auc(model, images, targets, -truth)
    chance = random_deletion_auc(
        model, images, targets, generator=torch.Generator().manual_seed(1), repeats=2
    )
    # Removing the 32 evidence pixels (3% of the image) first collapses the probability at once:
    # from the first of the 20 steps (round(1024 / 20) = 51 pixels) on, only the bias is left.
    start, floor = torch.sigmoid(model(images)[:, 1]), torch.sigmoid(torch.tensor(BIAS))
    first = 51 / 1024
    torch.testing.assert_close(faithful, first * (start + floor) / 2 + (1 - first) * floor)
    assert (chance > faithful + 0.4).all()
    assert (reversed_order > chance).all()
    assert (reversed_order > 0.9).all()
    # The weight map alone ranks the same pixels first, so it is just as faithful.
    assert torch.allclose(
        deletion_auc(model, images, targets, model.weights.expand_as(images)), faithful
    )


def test_curve_removes_the_highest_attributions_first(setup) -> None:
    _, images, targets = setup
    # Every pixel counts here, and the half-removed score sits near 0 where sigmoid is steepest,
    # so one pixel more or less removed shows.
    model = LinearClassModel(torch.full((1, 1, SIDE, SIDE), 0.05), -16.0)
    fractions, probabilities = deletion_curve(model, images, targets, images, steps=8)
    # 1024 pixels in 8 steps: 128 more removed at each.
    torch.testing.assert_close(fractions, torch.arange(9) / 8)
    assert probabilities.shape == (4, 9)
    torch.testing.assert_close(probabilities[:, 0], torch.sigmoid(model(images)[:, 1]))
    # Halfway the 512 brightest pixels (the highest attributions) are 0.
    brightest = images.flatten(1).topk(512, dim=1).indices
    kept = images.flatten(1).scatter(1, brightest, 0.0).view_as(images)
    torch.testing.assert_close(probabilities[:, 4], torch.sigmoid(model(kept)[:, 1]))
    # Everything replaced by 0 leaves only the bias.
    torch.testing.assert_close(probabilities[:, -1], torch.sigmoid(torch.full((4,), -16.0)))


def test_targets_select_the_class_probability(setup) -> None:
    model, images, _ = setup
    targets = torch.tensor([0, 1, 0, 1])
    _, probabilities = deletion_curve(model, images, targets, images, steps=4)
    scores = model(images)
    expected = torch.sigmoid(scores.gather(1, targets[:, None]).squeeze(1))
    torch.testing.assert_close(probabilities[:, 0], expected)
    # Removing all pixels makes NORMAL (the negated score) likely, PNEUMONIA unlikely.
    assert (probabilities[targets == 0, -1] > 0.99).all()
    assert (probabilities[targets == 1, -1] < 0.01).all()


def test_the_probability_tracked_is_the_classifiers_calibrated_one(setup) -> None:
    # explain.py shows the temperature-scaled probability; the deletion curve must track the same
    # number, or a "probability" of 0.99 in trust.json is 0.73 in the figures.
    from pneumonia.explain.methods.common import ClassScores

    linear, images, _ = setup

    class Calibrated(nn.Module):
        def forward(self, x):
            return linear(x)[:, 1]

        def probabilities_from_logits(self, logits):
            return torch.sigmoid(logits / 4.0)  # temperature 4

    targets = torch.tensor([0, 1, 0, 1])
    _, probabilities = deletion_curve(ClassScores(Calibrated()), images, targets, images, steps=4)
    pneumonia = torch.sigmoid(linear(images)[:, 1] / 4.0)
    expected = torch.where(targets == 1, pneumonia, 1 - pneumonia)
    torch.testing.assert_close(probabilities[:, 0], expected)


def test_mean_baseline_fills_with_each_images_own_mean(setup) -> None:
    model, images, targets = setup
    images = images * torch.tensor([1.0, 0.5, 0.2, 0.1]).view(4, 1, 1, 1)
    _, probabilities = deletion_curve(model, images, targets, images, steps=5, baseline="mean")
    filled = images.mean(dim=(1, 2, 3), keepdim=True).expand_as(images)
    torch.testing.assert_close(probabilities[:, -1], torch.sigmoid(model(filled)[:, 1]))
    with pytest.raises(ValueError, match="mean"):
        deletion_curve(model, images, targets, images, baseline="median")


def test_batching_does_not_change_the_curve(setup) -> None:
    model, images, targets = setup
    attributions = torch.randn(images.shape, generator=torch.Generator().manual_seed(3))
    _, together = deletion_curve(model, images, targets, attributions, steps=6, batch_size=1000)
    _, chunked = deletion_curve(model, images, targets, attributions, steps=6, batch_size=3)
    torch.testing.assert_close(together, chunked)


def test_ties_are_broken_in_raster_order() -> None:
    weights = torch.zeros(1, 1, 2, 2)
    weights[..., 0, 0] = 1.0  # only the first pixel in raster order matters
    model = LinearClassModel(weights, 0.0)
    images = torch.ones(1, 1, 2, 2)
    _, probabilities = deletion_curve(
        model, images, torch.ones(1, dtype=torch.long), torch.zeros(1, 1, 2, 2), steps=4
    )
    # All-equal attributions remove pixel (0, 0) first: the probability drops at the first step.
    assert probabilities[0, 1] == pytest.approx(0.5)


def test_random_baseline_is_reproducible_with_a_generator(setup) -> None:
    model, images, targets = setup
    first = random_deletion_auc(model, images, targets, generator=torch.Generator().manual_seed(7))
    second = random_deletion_auc(model, images, targets, generator=torch.Generator().manual_seed(7))
    other = random_deletion_auc(model, images, targets, generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(first, second)
    assert not torch.equal(first, other)


@pytest.mark.parametrize("training", [True, False])
def test_runs_in_eval_mode_and_restores_the_mode(setup, training: bool) -> None:
    model, images, targets = setup
    model.train(training)
    model.modes_seen.clear()
    deletion_auc(model, images, targets, images, steps=3)
    random_deletion_auc(model, images, targets, steps=3)
    assert model.modes_seen and not any(model.modes_seen)
    assert model.training is training


def test_eval_mode_restores_mixed_modes() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout())
    model.train()
    model[1].eval()
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert model.training and model[0].training and not model[1].training


def test_mismatched_attributions_are_rejected(setup) -> None:
    model, images, targets = setup
    with pytest.raises(ValueError, match="do not match"):
        deletion_curve(model, images, targets, torch.zeros(4, 1, 16, 16))
