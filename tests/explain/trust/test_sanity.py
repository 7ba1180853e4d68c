"""Cascading parameter randomisation on a tiny CNN with a plain-gradient attribution."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import pytest
import torch
from scipy.stats import spearmanr
from torch import nn

from pneumonia.explain.trust.sanity import (
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


def expected_cascade(
    model: nn.Module,
    attribute_fn,
    images: torch.Tensor,
    targets: torch.Tensor,
    layers: Sequence[str],
    seed: int = 0,
) -> list[torch.Tensor]:
    """The documented algorithm, step by step: layer k reset under seed + k, on top of the earlier
    ones, and |maps| compared with the trained model's |maps|."""
    model = copy.deepcopy(model).eval()
    modules = dict(model.named_modules())
    reference = attribute_fn(model, images, targets).abs()
    correlations = []
    with torch.random.fork_rng():
        for k, name in enumerate(layers):
            torch.manual_seed(seed + k)
            modules[name].reset_parameters()
            correlations.append(spearman(reference, attribute_fn(model, images, targets).abs()))
    return correlations


class Flip(nn.Module):
    """Multiplies by a weight that starts at 1 and is -1 once re-initialised: its map flips sign."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(1))

    def reset_parameters(self) -> None:
        nn.init.constant_(self.weight, -1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


def the_model_output(model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return model(images)


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


def test_spearman_equals_scipy_on_maps_with_many_ties() -> None:
    generator = torch.Generator().manual_seed(1)
    a = torch.randint(0, 5, (4, 1, 6, 6), generator=generator).float()
    b = torch.randint(0, 5, (4, 1, 6, 6), generator=generator).float() + a
    expected = [
        spearmanr(x.flatten().numpy(), y.flatten().numpy())[0] for x, y in zip(a, b, strict=True)
    ]
    torch.testing.assert_close(spearman(a, b), torch.tensor(expected, dtype=torch.float64))


def test_gradient_maps_decorrelate_as_layers_are_randomised(batch) -> None:
    model = tiny_cnn()
    images, targets = batch
    steps = cascading_randomization(model, gradient, images, targets, seed=3)
    # Output to input, each step on top of the previous ones, each seeded with seed + k.
    assert [step.layer for step in steps] == ["5", "2", "0"]
    expected = expected_cascade(model, gradient, images, targets, ["5", "2", "0"], seed=3)
    for step, correlations in zip(steps, expected, strict=True):
        assert isinstance(step, RandomizationStep)
        torch.testing.assert_close(step.rank_correlations, correlations)
        assert step.mean_rank_correlation == pytest.approx(float(correlations.mean()))
    # A self-comparison gives 1; with every layer re-initialised the maps are nearly unrelated.
    assert steps[-1].mean_rank_correlation < 0.5


def test_a_model_independent_map_is_flagged(batch) -> None:
    images, targets = batch
    steps = cascading_randomization(tiny_cnn(), the_image_itself, images, targets)
    assert len(steps) == 3
    for step in steps:
        assert step.mean_rank_correlation == pytest.approx(1.0)


def test_callers_model_and_rng_are_untouched_and_maps_come_from_eval_mode(batch) -> None:
    model = tiny_cnn()
    model.train()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    images, targets = batch
    modes_seen: list[bool] = []

    def recording(model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        modes_seen.append(model.training)
        return gradient(model, images, targets)

    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    cascading_randomization(model, recording, images, targets, seed=5)
    torch.testing.assert_close(torch.rand(3), expected_next)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert model.training
    assert modes_seen == [False] * 4  # the reference and one map per layer, all in eval mode


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
    expected = expected_cascade(tiny_cnn(), gradient, images, targets, ["2", "5"])
    for step, correlations in zip(steps, expected, strict=True):
        torch.testing.assert_close(step.rank_correlations, correlations)


@pytest.mark.parametrize(
    ("absolute", "correlation"), [(None, 1.0), (True, 1.0), (False, -1.0)], ids=str
)
def test_absolute_compares_magnitudes_and_signed_compares_signs(
    batch, absolute: bool | None, correlation: float
) -> None:
    # Randomising the layer negates the map: same magnitudes, opposite signs.
    images, targets = batch
    options = {} if absolute is None else {"absolute": absolute}
    steps = cascading_randomization(
        nn.Sequential(Flip()), the_model_output, images, targets, **options
    )
    assert [step.layer for step in steps] == ["0"]
    torch.testing.assert_close(
        steps[0].rank_correlations, torch.full((4,), correlation, dtype=torch.float64)
    )


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
