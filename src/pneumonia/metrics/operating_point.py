"""Operating points: rules that choose the decision threshold on P(PNEUMONIA) from validation data.

A prediction is PNEUMONIA when its probability is at or above the threshold (``p >= t``). Each rule
is a small class registered for the ``operating_point`` role of :mod:`pneumonia.model.registry`, so
a config or a checkpoint names it as ``{"_target_": "pneumonia.metrics.operating_point.<Class>",
...}`` with plain numbers as arguments. ``choose(probabilities, targets)`` returns the threshold and
``describe()`` says in one line what it is.

Data-driven thresholds are placed halfway between two adjacent distinct validation scores (never on
a score), so the choice does not hinge on one image's exact probability; the halfway point is
computed in the scores' own floating dtype and is therefore representable in it, so ``p >= t``
decides the same whether compared in that dtype or in float64. Below the lowest score the threshold
is halfway to 0, above the highest halfway to 1. All rules sort once and use cumulative counts:
O(N log N).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from pneumonia.model import registry

log = logging.getLogger(__name__)

FALLBACK_THRESHOLD = 0.5


def _as_array(values: Any, name: str) -> np.ndarray:
    """A 1-D numpy array, keeping a floating dtype (bfloat16 becomes float32, exactly)."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu()
        if values.dtype == torch.bfloat16:
            values = values.float()
        values = values.numpy()
    array = np.asarray(values)
    if array.ndim > 1 and array.size != max(array.shape):
        raise ValueError(f"{name} must be one value per image, got shape {array.shape}")
    return array.reshape(-1)


def _checked(probabilities: Any, targets: Any) -> tuple[np.ndarray, np.ndarray]:
    """Scores (floating dtype kept, float64 for anything else) and labels as int64 0/1."""
    p = _as_array(probabilities, "probabilities")
    if not np.issubdtype(p.dtype, np.floating):
        p = p.astype(np.float64)
    if not (np.isfinite(p).all() and (p >= 0).all() and (p <= 1).all()):
        raise ValueError("probabilities must be finite and in [0, 1]")
    y = _as_array(targets, "targets")
    if y.size != p.size:
        raise ValueError(f"targets has {y.size} values but there are {p.size} probabilities")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("targets must be 0 (NORMAL) or 1 (PNEUMONIA)")
    return p, y.astype(np.int64)


def _fallback_reason(p: np.ndarray, y: np.ndarray) -> str | None:
    if y.size == 0:
        return "no validation data"
    if y.min() == y.max():
        return f"validation holds only {'PNEUMONIA' if y[0] else 'NORMAL'} images"
    if p.min() == p.max():
        # A threshold at or below that one value would call every image PNEUMONIA.
        return f"every validation image has P(PNEUMONIA) = {p[0]:g}, which ranks none above another"
    return None


def _warn_fallback(rule: str, reason: str, threshold: float) -> None:
    log.warning("%s: %s; using threshold %s", rule, reason, threshold)


def _check_fraction(name: str, value: Any, low_open: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.number):
        raise ValueError(f"{name} must be a number, got {value!r}")
    value = float(value)
    inside = (0.0 < value <= 1.0) if low_open else (0.0 <= value <= 1.0)
    if not inside:
        raise ValueError(f"{name} must be in {'(0, 1]' if low_open else '[0, 1]'}, got {value}")
    return value


class _Candidates:
    """Every distinct way to split the sorted scores, with its threshold and confusion counts.

    With distinct scores ``u_1 < ... < u_k``, candidate ``i`` (0..k) calls PNEUMONIA exactly the
    scores above ``u_i`` (``u_0 = -inf``): ``tp[i]`` true positives, ``tn[i]`` true negatives, at
    threshold ``t[i]`` halfway between ``u_i`` and ``u_{i+1}``. Candidate k (all NORMAL) exists
    only when ``u_k < 1``; otherwise it is dropped.
    """

    def __init__(self, p: np.ndarray, y: np.ndarray) -> None:
        order = np.argsort(p, kind="stable")
        scores, labels = p[order], y[order]
        last = np.flatnonzero(np.r_[scores[1:] != scores[:-1], True])  # last index of each score
        distinct = scores[last]
        positives_at_or_below = np.r_[0, np.cumsum(labels)[last]]
        negatives_at_or_below = np.r_[0, last + 1] - positives_at_or_below
        self.positives, self.negatives = int(labels.sum()), int(labels.size - labels.sum())
        self.tp = self.positives - positives_at_or_below
        self.tn = negatives_at_or_below

        dtype = scores.dtype
        lower = np.r_[np.zeros(1, dtype), distinct]
        upper = np.r_[distinct, np.ones(1, dtype)]
        halfway = lower + (upper - lower) / dtype.type(2)
        # Where rounding lands the halfway point on the lower score, the upper one splits the same.
        self.thresholds = np.where(halfway > lower, halfway, upper)
        if not self.thresholds[-1] > distinct[-1]:  # u_k == 1: nothing can be called all NORMAL
            self.tp, self.tn, self.thresholds = self.tp[:-1], self.tn[:-1], self.thresholds[:-1]


class ThresholdRule:
    """A rule choosing the threshold; subclasses implement :meth:`choose` and :meth:`describe`."""

    def choose(
        self, probabilities: np.ndarray | torch.Tensor, targets: np.ndarray | torch.Tensor
    ) -> float:
        """The threshold in [0, 1] for ``probabilities`` of PNEUMONIA with labels ``targets``."""
        threshold, reason = self.choose_explained(probabilities, targets)
        if reason is not None:
            _warn_fallback(self.describe(), reason, threshold)
        return threshold

    def choose_explained(
        self, probabilities: np.ndarray | torch.Tensor, targets: np.ndarray | torch.Tensor
    ) -> tuple[float, str | None]:
        """``(threshold, reason)``: why the rule fell back to 0.5, or None when it did not."""
        p, y = _checked(probabilities, targets)
        reason = _fallback_reason(p, y)
        candidates = None if reason else _Candidates(p, y)
        chosen = None if candidates is None else self._pick(candidates)
        if chosen is None:
            return FALLBACK_THRESHOLD, reason or "no threshold does better than chance"
        return float(candidates.thresholds[chosen]), None

    def _pick(self, candidates: _Candidates) -> int | None:
        """The chosen candidate's index, or None when the scores give the rule nothing to go on."""
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.describe()!r})"


@registry.register("operating_point")
class FixedThreshold(ThresholdRule):
    """Always the same threshold, whatever the data (the study used 0.5).

    Args:
        threshold: probability in [0, 1] at or above which a prediction is PNEUMONIA.
    """

    def __init__(self, threshold: float = 0.5) -> None:
        self.threshold = _check_fraction("threshold", threshold, low_open=False)

    def choose_explained(
        self, probabilities: np.ndarray | torch.Tensor, targets: np.ndarray | torch.Tensor
    ) -> tuple[float, str | None]:
        _checked(probabilities, targets)
        return self.threshold, None

    def describe(self) -> str:
        return f"fixed threshold {self.threshold:g}"


@registry.register("operating_point")
class MaxBalancedAccuracy(ThresholdRule):
    """The threshold maximising balanced accuracy, (sensitivity + specificity) / 2, on the data.

    Youden's J = sensitivity + specificity - 1 = 2 x balanced accuracy - 1, so this is also the
    Youden-optimal threshold. Sensitivity + specificity is compared exactly, as the integer
    ``tp * negatives + tn * positives``. When several adjacent candidates tie (a plateau), the
    widest best plateau is taken (the lowest-threshold one among equally wide plateaus) and its
    middle candidate is chosen (the lower, more sensitive, of two middles). When no threshold
    beats chance (balanced accuracy 0.5: scores unrelated or inversely related to the labels),
    the rule keeps the fallback 0.5 rather than a threshold that calls every image one class.
    """

    def _pick(self, candidates: _Candidates) -> int | None:
        score = candidates.tp * candidates.negatives + candidates.tn * candidates.positives
        if score.max() <= candidates.positives * candidates.negatives:
            return None
        best = np.flatnonzero(score == score.max())
        runs = np.split(best, np.flatnonzero(np.diff(best) > 1) + 1)
        widest = max(runs, key=len)  # max keeps the first of equally wide runs
        return int(widest[(len(widest) - 1) // 2])

    def describe(self) -> str:
        return "threshold maximising balanced accuracy (Youden's J) on validation"


@registry.register("operating_point")
class TargetSensitivity(ThresholdRule):
    """The highest threshold (the most specific) whose sensitivity on the data reaches a target.

    Args:
        sensitivity: the target, in (0, 1]; e.g. 0.95 for screening, where a missed pneumonia
            costs more than a false alarm.
    """

    def __init__(self, sensitivity: float = 0.95) -> None:
        self.sensitivity = _check_fraction("sensitivity", sensitivity, low_open=True)

    def _pick(self, candidates: _Candidates) -> int | None:
        # Sensitivity falls as the threshold rises; candidate 0 calls everything PNEUMONIA (1.0).
        meets = candidates.tp / candidates.positives >= self.sensitivity
        return int(np.flatnonzero(meets)[-1])

    def describe(self) -> str:
        return f"highest threshold with sensitivity >= {self.sensitivity:g} on validation"


def choose_threshold(
    rule_node: Mapping[str, Any] | None,
    probabilities: np.ndarray | torch.Tensor,
    targets: np.ndarray | torch.Tensor,
) -> tuple[float, str]:
    """Build the rule ``rule_node`` (registry-checked) and apply it to validation predictions.

    Args:
        rule_node: ``{"_target_": "pneumonia.metrics.operating_point.<Class>", ...}``; ``None`` or
            empty means the study's fixed 0.5.
        probabilities: ``(N,)`` validation P(PNEUMONIA) in [0, 1].
        targets: ``(N,)`` validation labels, 0 or 1.

    Returns:
        ``(threshold, description)``; the description says when a data-driven rule fell back to
        0.5 (empty data, one class, equal scores, or no threshold better than chance).

    Raises:
        pneumonia.model.registry.UnsafeConfigError: the node names no registered rule.
        ValueError: invalid rule arguments or data.
    """
    rule = registry.build("operating_point", rule_node) if rule_node else FixedThreshold(0.5)
    threshold, reason = rule.choose_explained(probabilities, targets)
    description = rule.describe()
    if reason is not None:
        _warn_fallback(description, reason, threshold)
        description += f" (fell back to {threshold}: {reason})"
    return float(threshold), description
