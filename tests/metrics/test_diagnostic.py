import math

import numpy as np
import pytest
import torch
from sklearn.metrics import (
    balanced_accuracy_score,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

from pneumonia.metrics.diagnostic import DiagnosticMetrics, metrics_from_confusion


def test_metrics_of_a_hand_computed_confusion_matrix():
    # tn=50 fp=10 / fn=5 tp=135
    values = metrics_from_confusion(torch.tensor([[50, 10], [5, 135]]))
    assert float(values["recall"]) == pytest.approx(135 / 140)
    assert float(values["specificity"]) == pytest.approx(50 / 60)
    assert float(values["precision"]) == pytest.approx(135 / 145)
    assert float(values["balanced_accuracy"]) == pytest.approx((135 / 140 + 50 / 60) / 2)
    assert float(values["f1"]) == pytest.approx(2 * 135 / (2 * 135 + 15))
    assert float(values["accuracy"]) == pytest.approx(185 / 200)


def test_batched_updates_agree_with_scikit_learn():
    rng = np.random.default_rng(0)
    targets = rng.integers(0, 2, 500)
    probabilities = np.clip(targets * 0.35 + rng.random(500) * 0.65, 0, 1)
    metrics = DiagnosticMetrics(threshold=0.5)
    for chunk in np.array_split(np.arange(500), 7):
        metrics.update(torch.tensor(probabilities[chunk]), torch.tensor(targets[chunk]))
    values = {k: float(v) for k, v in metrics.compute().items()}
    predicted = (probabilities >= 0.5).astype(int)
    assert values["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(targets, predicted))
    assert values["precision"] == pytest.approx(precision_score(targets, predicted))
    assert values["recall"] == pytest.approx(recall_score(targets, predicted))
    assert values["specificity"] == pytest.approx(recall_score(targets, predicted, pos_label=0))
    assert values["f1"] == pytest.approx(f1_score(targets, predicted))
    assert values["auroc"] == pytest.approx(roc_auc_score(targets, probabilities), abs=1e-6)
    tn, fp, fn, tp = np.bincount(targets * 2 + predicted, minlength=4)
    assert metrics.confusion_matrix().tolist() == [[tn, fp], [fn, tp]]


def test_threshold_moves_predictions():
    metrics = DiagnosticMetrics(threshold=0.8)
    metrics.update(torch.tensor([0.7, 0.9]), torch.tensor([1, 1]))
    assert metrics.confusion_matrix().tolist() == [[0, 0], [1, 1]]


def test_single_class_gives_nan_auroc_not_a_crash():
    metrics = DiagnosticMetrics()
    metrics.update(torch.tensor([0.2, 0.9]), torch.tensor([1, 1]))
    values = metrics.compute()
    assert math.isnan(float(values["auroc"]))
    assert float(values["specificity"]) == 0.0  # undefined -> 0, as scikit-learn's zero_division=0
    # Balanced accuracy averages the classes present, as scikit-learn does: here the recall alone.
    assert float(values["balanced_accuracy"]) == float(values["recall"]) == 0.5
    assert balanced_accuracy_score([1, 1], [0, 1]) == 0.5
    metrics.reset()
    assert metrics.confusion_matrix().sum() == 0
