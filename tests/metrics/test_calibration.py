import math

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from pneumonia.metrics.calibration import (
    binary_nll,
    calibrated_probabilities,
    expected_calibration_error,
    fit_temperature,
    reliability_diagram,
)


def _over_confident(n: int, factor: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``factor * s`` whose labels follow ``sigmoid(s)``: the true temperature is ``factor``."""
    generator = torch.Generator().manual_seed(seed)
    s = torch.randn(n, generator=generator, dtype=torch.float64) * 2.0
    y = torch.bernoulli(torch.sigmoid(s), generator=generator)
    return factor * s, y


def test_temperature_of_over_confident_logits_is_recovered():
    logits, targets = _over_confident(20_000, 3.0)
    assert fit_temperature(logits, targets) == pytest.approx(3.0, rel=0.1)


def test_calibrated_logits_keep_temperature_one():
    logits, targets = _over_confident(20_000, 1.0, seed=1)
    assert fit_temperature(logits, targets) == pytest.approx(1.0, rel=0.1)


def test_under_confident_logits_get_temperature_below_one():
    logits, targets = _over_confident(20_000, 0.5, seed=2)
    assert fit_temperature(logits, targets) == pytest.approx(0.5, rel=0.1)


def test_fitted_temperature_minimises_the_nll():
    logits, targets = _over_confident(2_000, 2.0, seed=3)
    t = fit_temperature(logits, targets)
    assert binary_nll(logits, targets, t) <= binary_nll(logits, targets, 1.0)
    for other in (t * 0.9, t * 1.1):  # a minimum, not just an improvement
        assert binary_nll(logits, targets, t) <= binary_nll(logits, targets, other)


def test_nll_matches_torch():
    logits, targets = _over_confident(100, 2.0, seed=4)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits / 1.7, targets)
    assert binary_nll(logits, targets, 1.7) == pytest.approx(float(expected), rel=1e-12)


@pytest.mark.parametrize(
    ("logits", "targets", "reason"),
    [
        ([1.0, 2.0, -1.0], [1, 1, 1], "one class"),
        ([1.0, 2.0, -1.0], [0, 0, 0], "one class"),
        ([0.3], [1], "1 validation sample"),
        ([], [], "0 validation sample"),
        ([1.0, float("inf"), -1.0], [1, 0, 1], "not finite"),
        ([1.0, float("nan"), -1.0], [1, 0, 1], "not finite"),
    ],
)
def test_unfittable_data_leave_temperature_one_and_say_why(logits, targets, reason, caplog):
    # Said why: a NaN loss also ends at T = 1 (it is never "better"), for no stated reason.
    assert fit_temperature(torch.tensor(logits), torch.tensor(targets)) == 1.0
    assert "temperature scaling left at T = 1: " in caplog.text and reason in caplog.text


def test_separable_data_stop_at_the_lower_bound():
    logits = torch.tensor([-2.0, -1.0, 1.0, 2.0])
    assert fit_temperature(logits, torch.tensor([0, 0, 1, 1])) == pytest.approx(0.05)


def test_half_precision_input_works_on_the_cpu():
    logits, targets = _over_confident(5_000, 3.0, seed=5)
    t = fit_temperature(logits.half(), targets.half())
    assert isinstance(t, float)
    assert t == pytest.approx(3.0, rel=0.1)
    assert fit_temperature(logits.bfloat16(), targets.long()) == pytest.approx(t, rel=0.02)


def test_targets_must_be_labels():
    with pytest.raises(ValueError, match="targets"):
        fit_temperature(torch.tensor([0.1, 0.2]), torch.tensor([0.0, 0.5]))
    with pytest.raises(ValueError, match="targets"):
        fit_temperature(torch.tensor([0.1, 0.2]), torch.tensor([0, 1, 1]))


def test_calibrated_probabilities_divide_the_logit():
    logits = torch.tensor([-2.0, 0.0, 3.0], dtype=torch.float16)
    probabilities = calibrated_probabilities(logits, 2.0)
    assert probabilities.dtype == torch.float32
    assert torch.allclose(probabilities, torch.sigmoid(torch.tensor([-1.0, 0.0, 1.5])))
    with pytest.raises(ValueError, match="temperature"):
        calibrated_probabilities(logits, 0.0)


def test_ece_of_calibrated_probabilities_is_small():
    rng = np.random.default_rng(0)
    p = rng.random(200_000)
    y = (rng.random(p.size) < p).astype(int)
    assert expected_calibration_error(p, y) < 0.01


def test_ece_of_a_constant_over_confident_score():
    y = np.array([0, 1] * 500)
    assert expected_calibration_error(np.full(y.size, 0.9), y) == pytest.approx(0.4)


def test_ece_by_hand_with_two_bins():
    # bin [0, .5): p .1 .3 (mean .2), y 0 1 (.5) -> |.2 - .5| = .3, weight 2/5
    # bin [.5, 1]: p .5 .7 .9 (mean .7), y 1 1 1 (1) -> .3, weight 3/5
    p = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9])
    y = torch.tensor([0, 1, 1, 1, 1])
    assert expected_calibration_error(p, y, n_bins=2) == pytest.approx(0.3, abs=1e-7)
    # An inner edge belongs to the bin above it: .5 -> [.5, 1]; .2 -> [0, .5). (.2 + .5) / 2 = .35.
    assert expected_calibration_error([0.5, 0.2], [1, 0], n_bins=2) == pytest.approx(0.35)


def test_ece_counts_zero_and_one():
    assert expected_calibration_error([0.0, 1.0], [0, 1]) == 0.0
    assert expected_calibration_error([0.0, 1.0], [1, 0]) == pytest.approx(1.0)
    assert expected_calibration_error([1.0, 1.0], [1, 0], n_bins=1) == pytest.approx(0.5)
    # 1.0 shares the last bin [.9, 1] with .92: |.96 - .5| = .46 (a bin of its own would give .54).
    assert expected_calibration_error([0.92, 1.0], [1, 0], n_bins=10) == pytest.approx(0.46)
    assert expected_calibration_error([0.0, 0.08], [1, 0], n_bins=10) == pytest.approx(0.46)


def test_ece_matches_a_loop_over_bins():
    rng = np.random.default_rng(1)
    p = rng.random(1_000) ** 2
    y = (rng.random(p.size) < 0.3).astype(int)
    n_bins = 10
    expected = 0.0
    for b in range(n_bins):
        low, high = b / n_bins, (b + 1) / n_bins
        inside = (p >= low) & ((p < high) if b < n_bins - 1 else (p <= high))
        if inside.any():
            expected += inside.sum() / p.size * abs(p[inside].mean() - y[inside].mean())
    assert expected_calibration_error(p, y, n_bins=n_bins) == pytest.approx(expected)


def test_ece_of_nothing_is_nan():
    assert math.isnan(expected_calibration_error([], []))


@pytest.mark.parametrize(
    ("p", "y", "n_bins", "message"),
    [([1.2], [1], 15, r"probabilities must be finite and in \[0, 1\]"),
     ([float("nan")], [1], 15, r"probabilities must be finite"),
     ([0.3], [2], 15, r"targets must be 0 \(NORMAL\) or 1 \(PNEUMONIA\)"),
     ([0.3], [1], 0, r"n_bins must be an integer >= 1, got 0")],
)  # fmt: skip
def test_ece_refuses_bad_input(p, y, n_bins, message):
    with pytest.raises(ValueError, match=message):
        expected_calibration_error(p, y, n_bins=n_bins)


def test_reliability_diagram_shows_the_ece():
    y = np.array([0, 1] * 50)
    fig = reliability_diagram(np.full(y.size, 0.9), y, title="val")
    assert isinstance(fig, Figure)
    title = fig.axes[0].get_title()
    assert "val" in title
    assert "ECE = 0.400" in title
    assert len(fig.axes) == 2  # reliability and counts
    counts = [patch.get_height() for patch in fig.axes[1].patches]
    assert sum(counts) == y.size


def test_reliability_diagram_renders(tmp_path):
    rng = np.random.default_rng(2)
    p = rng.random(300)
    p[:2] = (0.0, 1.0)
    fig = reliability_diagram(p, (rng.random(300) < p).astype(int), n_bins=10)
    assert len(fig.axes[1].patches) == 10
    fig.savefig(tmp_path / "reliability.png")
    assert (tmp_path / "reliability.png").stat().st_size > 0
    assert reliability_diagram([], []).axes[0].get_title().endswith("(ECE = n/a)")
