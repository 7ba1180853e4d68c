"""Cascading parameter randomisation on a tiny CNN with a plain-gradient attribution."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pneumonia.explain.sanity import (
    RandomizationStep,
    cascading_randomization,
    parameterised_layers,
    spearman,
)


def tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 16 * 16, 2),
    )


def gradient(model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    inputs = images.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        score = model(inputs).gather(1, targets[:, None]).sum()
        (grads,) = torch.autograd.grad(score, inputs)
    return grads


def the_image_itself(model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return images.clone()


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    return images, torch.tensor([0, 1, 0, 1])


def test_spearman_reference_values() -> None:
    maps = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(spearman(maps, maps), torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(spearman(maps, -maps), -torch.ones(3, dtype=torch.float64))
    constant = torch.full_like(maps, 2.0)
    torch.testing.assert_close(spearman(maps, constant), torch.zeros(3, dtype=torch.float64))
    # Ranks, not values: a monotone transform keeps the correlation at 1.
    torch.testing.assert_close(spearman(maps, maps.exp() * 5), torch.ones(3, dtype=torch.float64))


def test_spearman_averages_tied_ranks() -> None:
    # x = [1, 2, 2, 3] has ranks [0, 1.5, 1.5, 3]; against y = [0, 1, 2, 3] Spearman is 0.9487.
    x = torch.tensor([[1.0, 2.0, 2.0, 3.0]])
    y = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    assert spearman(x, y).item() == pytest.approx(0.9486833, abs=1e-6)


def test_gradient_maps_decorrelate_as_layers_are_randomised(batch) -> None:
    model = tiny_cnn()
    images, targets = batch
    steps = cascading_randomization(model, gradient, images, targets)
    assert [step.layer for step in steps] == ["5", "2", "0"]
    assert all(isinstance(step, RandomizationStep) for step in steps)
    assert steps[0].rank_correlations.shape == (4,)
    # A self-comparison gives 1; with every layer re-initialised the maps are nearly unrelated.
    assert steps[-1].mean_rank_correlation < 0.5
    assert steps[-1].mean_rank_correlation == pytest.approx(
        float(steps[-1].rank_correlations.mean())
    )


def test_a_model_independent_map_is_flagged(batch) -> None:
    images, targets = batch
    steps = cascading_randomization(tiny_cnn(), the_image_itself, images, targets)
    assert len(steps) == 3
    for step in steps:
        assert step.mean_rank_correlation == pytest.approx(1.0)


def test_callers_model_and_rng_are_untouched(batch) -> None:
    model = tiny_cnn()
    model.train()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    images, targets = batch
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    cascading_randomization(model, gradient, images, targets, seed=5)
    torch.testing.assert_close(torch.rand(3), expected_next)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert model.training


def test_deterministic_given_the_seed(batch) -> None:
    images, targets = batch
    first = cascading_randomization(tiny_cnn(), gradient, images, targets, seed=1)
    second = cascading_randomization(tiny_cnn(), gradient, images, targets, seed=1)
    other = cascading_randomization(tiny_cnn(), gradient, images, targets, seed=2)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a.rank_correlations, b.rank_correlations)
    assert not torch.equal(first[-1].rank_correlations, other[-1].rank_correlations)


def test_explicit_layers_keep_the_given_order(batch) -> None:
    images, targets = batch
    steps = cascading_randomization(tiny_cnn(), gradient, images, targets, layers=["2", "5"])
    assert [step.layer for step in steps] == ["2", "5"]


def test_signed_comparison(batch) -> None:
    images, targets = batch
    negated = cascading_randomization(
        tiny_cnn(), lambda m, x, t: -x, images, targets, layers=["5"], absolute=False
    )
    # A map that is the same every step correlates perfectly whatever its sign.
    assert negated[0].mean_rank_correlation == pytest.approx(1.0)


@pytest.mark.parametrize("name", ["classifier", "1"])
def test_unknown_or_parameterless_layer_is_rejected(batch, name: str) -> None:
    images, targets = batch
    with pytest.raises(ValueError, match=rf"'{name}'.*\['0', '2', '5'\]"):
        cascading_randomization(tiny_cnn(), gradient, images, targets, layers=[name])


def test_parameterised_layers_finds_direct_owners() -> None:
    model = nn.Sequential(nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)), nn.ReLU())
    assert parameterised_layers(model) == ["0.0", "0.1"]


class Scale(nn.Module):
    """A layer owning a parameter but offering no reset_parameters()."""

    def __init__(self) -> None:
        super().__init__()
        self.factor = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor


def test_layer_without_reset_is_rejected_before_any_work(batch) -> None:
    calls: list[int] = []

    def counting(model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return images

    model = nn.Sequential(tiny_cnn(), Scale())
    images, targets = batch
    with pytest.raises(TypeError, match="'1'"):
        cascading_randomization(model, counting, images, targets)
    assert calls == []
