import logging
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from pneumonia.metrics.diagnostic import DiagnosticMetrics
from pneumonia.metrics.operating_point import (
    FixedThreshold,
    MaxBalancedAccuracy,
    TargetSensitivity,
    _Candidates,
    choose_threshold,
)
from pneumonia.model import registry

CONF = Path(__file__).resolve().parents[2] / "conf" / "operating_point"
MODULE = "pneumonia.metrics.operating_point"


def _rates(p, y, t) -> tuple[float, float]:
    """(sensitivity, specificity) of ``p >= t``, directly."""
    p, y = np.asarray(p), np.asarray(y)
    predicted = p >= t
    return predicted[y == 1].mean(), (~predicted[y == 0]).mean()


def _balanced_accuracy(p, y, t) -> float:
    return sum(_rates(p, y, t)) / 2


def test_separable_classes_are_split_between_them():
    p = np.array([0.05, 0.2, 0.31, 0.62, 0.7, 0.99])
    y = np.array([0, 0, 0, 1, 1, 1])
    t = MaxBalancedAccuracy().choose(p, y)
    assert 0.31 < t < 0.62
    assert t == pytest.approx((0.31 + 0.62) / 2)
    assert _balanced_accuracy(p, y, t) == 1.0


def test_balanced_accuracy_by_hand():
    # sorted: .2(N) .3(P) .6(N) .7(P) .9(P); P = 3, N = 2. Candidates (sens, spec):
    # .1 (1, 0)  .25 (1, .5)  .45 (2/3, .5)  .65 (2/3, 1)  .8 (1/3, 1)  .95 (0, 1): best .65
    p = torch.tensor([0.7, 0.2, 0.9, 0.6, 0.3], dtype=torch.float64)
    y = torch.tensor([1, 0, 1, 0, 1])
    assert MaxBalancedAccuracy().choose(p, y) == pytest.approx(0.65)


def test_balanced_accuracy_ties_take_the_middle_of_the_widest_plateau():
    # P = N = 3; a tie holding one of each class leaves sens + spec unchanged. Relative J of the
    # candidates .05 .15 .25 .4 .65 .9: 0 1 0 1 1 0 -> the widest plateau is .4-.65, whose lower
    # middle is .4 (the lone .15 is as good but narrower).
    p = np.array([0.1, 0.2, 0.3, 0.5, 0.5, 0.8])
    y = np.array([0, 1, 0, 1, 0, 1])
    assert MaxBalancedAccuracy().choose(p, y) == pytest.approx(0.4)
    # Three tied candidates .25 .5 .75 (P = N = 3): the middle one.
    p = np.array([0.1, 0.4, 0.4, 0.6, 0.6, 0.9])
    y = np.array([0, 0, 1, 0, 1, 1])
    assert MaxBalancedAccuracy().choose(p, y) == pytest.approx(0.5)
    # Two separate single-candidate maxima (.225 and .6): the lower, more sensitive one.
    p = np.array([0.1, 0.4, 0.35, 0.8])
    y = np.array([0, 0, 1, 1])
    assert MaxBalancedAccuracy().choose(p, y) == pytest.approx(0.225)


def test_ends_are_halfway_to_zero_and_one():
    p = np.array([0.3, 0.7])
    assert _Candidates(p, np.array([0, 1])).thresholds.tolist() == pytest.approx([0.15, 0.5, 0.85])
    # Scores ranking the classes backwards: sensitivity 1 only by calling everything PNEUMONIA.
    assert TargetSensitivity(1.0).choose(p, np.array([1, 0])) == pytest.approx(0.15)


def test_a_top_score_of_one_leaves_no_all_normal_threshold():
    # "All NORMAL" would need t > 1; t = 1 would still call the 1.0 scores PNEUMONIA.
    candidates = _Candidates(np.array([0.3, 0.5, 1.0, 1.0]), np.array([1, 0, 1, 0]))
    assert candidates.thresholds.tolist() == pytest.approx([0.15, 0.4, 0.75])
    assert candidates.tp.tolist() == [2, 1, 1] and candidates.tn.tolist() == [0, 0, 1]
    assert TargetSensitivity(0.5).choose(np.array([0.0, 1.0]), np.array([0, 1])) == 0.5


@pytest.mark.parametrize(
    "p, y",
    [([0.3, 0.7], [1, 0]),  # backwards: only all-PNEUMONIA or all-NORMAL reach 0.5
     ([0.3, 0.5, 1.0, 1.0], [1, 0, 1, 0]),  # no split beats chance
     ([0.0, 0.0, 0.0, 0.0], [0, 1, 0, 1]),  # a network answering 0 for every image
     ([0.7, 0.7, 0.7], [1, 0, 1])],
)  # fmt: skip
def test_scores_no_better_than_chance_keep_one_half_and_say_why(p, y, caplog):
    p, y = np.array(p), np.array(y)
    with caplog.at_level(logging.WARNING, logger=MODULE):
        assert MaxBalancedAccuracy().choose(p, y) == 0.5
    assert "using threshold 0.5" in caplog.records[0].getMessage()
    threshold, description = choose_threshold({"_target_": f"{MODULE}.MaxBalancedAccuracy"}, p, y)
    assert threshold == 0.5 and "fell back to 0.5" in description
    if p.min() == p.max():
        assert "ranks none above another" in description
        assert TargetSensitivity(0.95).choose(p, y) == 0.5


def test_target_sensitivity_by_hand():
    p = np.array([0.2, 0.3, 0.6, 0.7, 0.9])
    y = np.array([0, 1, 0, 1, 1])
    assert TargetSensitivity(0.95).choose(p, y) == pytest.approx(0.25)
    assert TargetSensitivity(0.6).choose(p, y) == pytest.approx(0.65)
    assert TargetSensitivity(1 / 3).choose(p, y) == pytest.approx(0.8)


def test_target_sensitivity_is_met_by_the_highest_threshold():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    p = np.clip(0.3 * y + 0.7 * rng.random(400), 0, 1)
    for target in (0.5, 0.8, 0.9, 0.95, 0.99, 1.0):
        t = TargetSensitivity(target).choose(p, y)
        assert _rates(p, y, t)[0] >= target
        # The next distinct score above the threshold would miss the target.
        above = p[p > t]
        if above.size:
            assert _rates(p, y, np.nextafter(above.min(), 2))[0] < target


def test_an_exact_target_is_reached():
    # 19 of 20 positives is sensitivity 0.95 exactly; the threshold must keep 19, not 20.
    p = np.r_[np.linspace(0.0, 0.4, 10), np.linspace(0.5, 0.99, 20)]
    y = np.r_[np.zeros(10, int), np.ones(20, int)]
    t = TargetSensitivity(0.95).choose(p, y)
    assert _rates(p, y, t)[0] == 0.95
    assert p[10] < t < p[11]


def test_thresholds_decide_the_same_in_float32_and_float64():
    # Adjacent float32 scores: halfway in float64 would round back onto one of them in float32.
    low = np.float32(0.3)
    high = np.nextafter(low, np.float32(1))
    p = torch.tensor([0.1, low, high, 0.9], dtype=torch.float32)
    y = torch.tensor([0, 0, 1, 1])
    for rule in (MaxBalancedAccuracy(), TargetSensitivity(1.0)):
        t = rule.choose(p, y)
        assert (p >= t).tolist() == [False, False, True, True]
        assert (p.double() >= t).tolist() == [False, False, True, True]
        assert low < t <= high


def test_thresholds_agree_with_diagnostic_metrics():
    rng = np.random.default_rng(1)
    y = torch.from_numpy(rng.integers(0, 2, 300))
    p = (0.25 * y + 0.75 * torch.rand(300, generator=torch.Generator().manual_seed(1))).float()
    t = TargetSensitivity(0.9).choose(p, y)
    metrics = DiagnosticMetrics(threshold=t)
    metrics.update(p, y)
    assert float(metrics.compute()["recall"]) >= 0.9
    t = MaxBalancedAccuracy().choose(p, y)
    metrics = DiagnosticMetrics(threshold=t)
    metrics.update(p, y)
    assert float(metrics.compute()["balanced_accuracy"]) == pytest.approx(
        _balanced_accuracy(p.numpy(), y.numpy(), t)
    )


def _brute_force(p: np.ndarray, y: np.ndarray) -> tuple[list[float], list[float], list[float]]:
    """Every threshold that splits the data differently, with its sensitivity and specificity."""
    distinct = sorted(set(p.tolist()))
    thresholds = distinct + ([np.inf] if distinct[-1] < 1 else [])
    sens, spec = [], []
    for t in thresholds:  # O(N) each: O(N^2) in all
        s, c = _rates(p, y, t)
        sens.append(s)
        spec.append(c)
    return thresholds, sens, spec


@pytest.mark.parametrize("seed", range(40))
def test_fast_rules_match_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 80))
    y = rng.integers(0, 2, n)
    y[:2] = (0, 1)
    # Rounded scores give ties within and across classes, and sometimes exactly 0 or 1.
    p = np.round(np.clip(0.2 * y + rng.random(n) * rng.uniform(0.5, 1.2), 0, 1), 1)
    thresholds, sens, spec = _brute_force(p, y)
    distinct = sorted(set(p.tolist()))

    t = MaxBalancedAccuracy().choose(p, y)
    best = max((s + c) / 2 for s, c in zip(sens, spec, strict=True))
    assert _balanced_accuracy(p, y, t) == pytest.approx(best)
    assert (t not in distinct or t == 0) and 0 <= t <= 1  # 0 only to call all PNEUMONIA

    for target in (0.5, 0.9, 1.0):
        # The highest score at or above which the target is still met, and the one below it.
        i = max(i for i, s in enumerate(sens) if s >= target)
        below = distinct[i - 1] if i > 0 else 0.0
        upper = min(thresholds[i], 1.0)
        assert TargetSensitivity(target).choose(p, y) == pytest.approx((below + upper) / 2)


def test_large_inputs_take_n_log_n_time():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 500_000)
    p = rng.random(y.size).astype(np.float32)
    start = time.perf_counter()
    MaxBalancedAccuracy().choose(p, y)
    TargetSensitivity(0.95).choose(p, y)
    assert time.perf_counter() - start < 15  # an O(N^2) scan would take hours


def test_fixed_threshold_ignores_the_data():
    p, y = np.array([0.1, 0.9]), np.array([1, 0])
    assert FixedThreshold().choose(p, y) == 0.5
    assert FixedThreshold(0.8).choose(p, y) == 0.8
    assert FixedThreshold(0).choose(np.array([]), np.array([])) == 0.0


@pytest.mark.parametrize("targets", [[1, 1, 1], [0, 0, 0], []])
def test_one_class_or_no_data_falls_back_to_one_half(targets, caplog):
    p = np.linspace(0.1, 0.9, len(targets))
    with caplog.at_level(logging.WARNING, logger=MODULE):
        assert MaxBalancedAccuracy().choose(p, np.array(targets, int)) == 0.5
        assert TargetSensitivity().choose(p, np.array(targets, int)) == 0.5
    assert len(caplog.records) == 2
    assert "using threshold 0.5" in caplog.records[0].getMessage()
    node = {"_target_": f"{MODULE}.MaxBalancedAccuracy"}
    threshold, description = choose_threshold(node, p, np.array(targets, int))
    assert threshold == 0.5
    assert "fell back to 0.5" in description


@pytest.mark.parametrize(
    ("make", "argument"),
    [
        (lambda: FixedThreshold(1.5), "threshold"),
        (lambda: FixedThreshold(-0.1), "threshold"),
        (lambda: FixedThreshold("0.5"), "threshold"),
        (lambda: TargetSensitivity(0.0), "sensitivity"),
        (lambda: TargetSensitivity(1.01), "sensitivity"),
        (lambda: TargetSensitivity(True), "sensitivity"),
        (lambda: TargetSensitivity(float("nan")), "sensitivity"),
    ],
)
def test_invalid_arguments_are_named(make, argument):
    with pytest.raises(ValueError, match=argument):
        make()


@pytest.mark.parametrize(
    ("p", "y", "message"),
    [([0.2, 1.5], [0, 1], r"probabilities must be finite and in \[0, 1\]"),
     ([0.2, float("nan")], [0, 1], r"probabilities must be finite"),
     ([0.2, 0.4], [0, 2], r"targets must be 0 \(NORMAL\) or 1 \(PNEUMONIA\)"),
     ([0.2], [0, 1], r"targets has 2 values but there are 1 probabilities")],
)  # fmt: skip
def test_invalid_data_are_refused(p, y, message):
    with pytest.raises(ValueError, match=message):
        MaxBalancedAccuracy().choose(np.array(p), np.array(y))


# Rule and threshold of each config on the data of the test below: p .1 .2 .3 .55 .6 .7 with labels
# 0 1 0 0 1 1. Sensitivity .95 keeps every positive: halfway between .1 and .2. Balanced accuracy
# of the candidates .05 .15 .25 .425 .575 .65 .85: .5 .67 .5 .67 .83 .67 .5, best at .575 (not the
# 0.5 a rule falls back to).
EXPECTED_FILES = {
    "fixed": ("FixedThreshold", 0.5),
    "balanced_accuracy": ("MaxBalancedAccuracy", 0.575),
    "youden": ("MaxBalancedAccuracy", 0.575),
    "sensitivity": ("TargetSensitivity", 0.15),
}


@pytest.mark.parametrize("name", sorted(EXPECTED_FILES))
def test_registry_builds_every_config(name):
    node = OmegaConf.to_container(OmegaConf.load(CONF / f"{name}.yaml"))
    cls, expected = EXPECTED_FILES[name]
    rule = registry.build("operating_point", node)
    assert type(rule).__name__ == cls
    p, y = np.array([0.1, 0.2, 0.3, 0.55, 0.6, 0.7]), np.array([0, 1, 0, 0, 1, 1])
    # The DictConfig itself is accepted too.
    threshold, description = choose_threshold(OmegaConf.load(CONF / f"{name}.yaml"), p, y)
    assert threshold == pytest.approx(expected)
    assert description == rule.describe() and "\n" not in description


def test_choose_threshold_defaults_to_the_study():
    p, y = np.array([0.1, 0.7]), np.array([0, 1])
    assert choose_threshold(None, p, y) == (0.5, "fixed threshold 0.5")
    assert choose_threshold({}, p, y) == (0.5, "fixed threshold 0.5")
    node = {"_target_": f"{MODULE}.FixedThreshold", "threshold": 0.3}
    assert choose_threshold(node, p, y) == (0.3, "fixed threshold 0.3")


def test_unknown_rules_and_arguments_are_refused():
    with pytest.raises(registry.UnsafeConfigError):
        choose_threshold({"_target_": "os.system"}, [0.5], [1])
    with pytest.raises(registry.UnsafeConfigError):
        choose_threshold({"_target_": f"{MODULE}.ThresholdRule"}, [0.5], [1])
    with pytest.raises(TypeError, match="unexpected keyword"):
        choose_threshold({"_target_": f"{MODULE}.FixedThreshold", "thresh": 0.3}, [0.5], [1])
    with pytest.raises(ValueError, match="sensitivity"):
        choose_threshold({"_target_": f"{MODULE}.TargetSensitivity", "sensitivity": 2}, [0.5], [1])


def test_descriptions():
    assert MaxBalancedAccuracy().describe() == (
        "threshold maximising balanced accuracy (Youden's J) on validation"
    )
    assert TargetSensitivity(0.95).describe() == (
        "highest threshold with sensitivity >= 0.95 on validation"
    )
    assert "0.95" in repr(TargetSensitivity())
