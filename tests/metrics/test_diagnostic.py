import math
import warnings

import numpy as np
import pytest
import torch
from sklearn.metrics import (
    accuracy_score,
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
    # No NORMAL image: specificity is undefined (n/a), not 0 ("every NORMAL image missed").
    assert math.isnan(float(values["specificity"]))
    # Balanced accuracy averages the classes present, as scikit-learn does: here the recall alone.
    assert float(values["recall"]) == 0.5
    assert float(values["balanced_accuracy"]) == balanced_accuracy_score([1, 1], [0, 1])
    metrics.reset()
    assert metrics.confusion_matrix().sum() == 0
    metrics.update(torch.tensor([0.2, 0.9]), torch.tensor([0, 0]))  # no PNEUMONIA image
    values = metrics.compute()
    assert math.isnan(float(values["recall"])) and float(values["specificity"]) == 0.5
    assert float(values["precision"]) == 0.0 and float(values["balanced_accuracy"]) == 0.5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_every_metric_of_one_class_stays_on_the_cuda_device():
    # DDP on NCCL all-reduces logged metrics: a CPU tensor among CUDA ones fails there.
    metrics = DiagnosticMetrics().to("cuda")
    metrics.update(torch.tensor([0.2, 0.9], device="cuda"), torch.tensor([1, 1], device="cuda"))
    assert {value.device.type for value in metrics.compute().values()} == {"cuda"}


@pytest.mark.parametrize(
    ("targets", "probabilities"),
    [
        ([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]),  # nothing predicted PNEUMONIA: precision is 0/0
        ([0, 0, 0], [0.1, 0.7, 0.9]),  # no PNEUMONIA image: recall is 0/0, n/a
        ([1, 1, 1, 0], [0.6, 0.2, 0.9, 0.7]),  # no correct NORMAL prediction
        ([0, 1, 0, 1], [0.9, 0.1, 0.8, 0.2]),  # everything wrong: F1 is 0/(0 + 4)
        ([0, 0, 0], [0.1, 0.2, 0.3]),  # all right, nothing PNEUMONIA: precision and F1 are 0/0
    ],
)
def test_degenerate_predictions_agree_with_scikit_learn(targets, probabilities):
    metrics = DiagnosticMetrics(threshold=0.5)
    metrics.update(torch.tensor(probabilities), torch.tensor(targets))
    values = {k: float(v) for k, v in metrics.compute().items()}
    predicted = [int(p >= 0.5) for p in probabilities]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scikit-learn warns about a class absent from targets
        expected = {
            "balanced_accuracy": balanced_accuracy_score(targets, predicted),
            "precision": precision_score(targets, predicted, zero_division=np.nan),
            # A ratio with nothing to count is NaN (n/a), not scikit-learn's default 0.
            "recall": recall_score(targets, predicted, zero_division=np.nan),
            "specificity": recall_score(targets, predicted, pos_label=0, zero_division=np.nan),
            "f1": f1_score(targets, predicted, zero_division=np.nan),
            "accuracy": accuracy_score(targets, predicted),
        }
    assert {k: values[k] for k in expected} == pytest.approx(expected, nan_ok=True)
    if len(set(targets)) == 2:
        assert values["auroc"] == pytest.approx(roc_auc_score(targets, probabilities))
    else:
        assert math.isnan(values["auroc"])


@pytest.mark.parametrize("threshold", [0.5, 0.8, 0.3])
def test_a_probability_at_the_threshold_is_pneumonia(threshold):
    metrics = DiagnosticMetrics(threshold)
    just_below = torch.nextafter(torch.tensor(threshold), torch.tensor(0.0)).item()
    metrics.update(torch.tensor([threshold, threshold, just_below]), torch.tensor([1, 0, 1]))
    assert metrics.confusion_matrix().tolist() == [[0, 1], [1, 1]]
