"""Binary diagnostic metrics that are consistent by construction.

Precision, recall (sensitivity), specificity, F1, accuracy and balanced accuracy are all computed
from one confusion matrix accumulated by torchmetrics, so a results table can never contradict
itself (the study's weighted-model row did). AUROC comes from the same predicted probabilities.
PNEUMONIA (label 1) is the positive class.
"""

from __future__ import annotations

import torch
from torch import nn
from torchmetrics.classification import BinaryAUROC, BinaryStatScores

METRIC_NAMES: tuple[str, ...] = (
    "balanced_accuracy",
    "precision",
    "recall",
    "specificity",
    "f1",
    "accuracy",
    "auroc",
)


def _ratio(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    # NaN where the denominator is 0, as scikit-learn's zero_division=np.nan.
    numerator, denominator = numerator.double(), denominator.double()
    return torch.where(
        denominator > 0,
        numerator / denominator.clamp(min=1),
        torch.full_like(numerator, float("nan")),
    )


def metrics_from_confusion(confusion: torch.Tensor) -> dict[str, torch.Tensor]:
    """Metrics of a 2x2 confusion matrix ``[[tn, fp], [fn, tp]]`` (rows: true class, columns: predicted)."""
    (tn, fp), (fn, tp) = confusion.double()
    # A ratio with nothing to count is NaN (reported as n/a, like AUROC), not a 0 that reads as
    # "every image was missed" or "every call was wrong": recall and specificity of a class absent
    # from the data, precision when nothing was called PNEUMONIA, F1 with no PNEUMONIA anywhere.
    recall = _ratio(tp, tp + fn)
    specificity = _ratio(tn, tn + fp)
    precision = _ratio(tp, tp + fp)
    # Mean recall over the classes present, as scikit-learn's balanced_accuracy_score: a split with
    # no NORMAL image must not score half its sensitivity.
    present = torch.stack([tn + fp > 0, tp + fn > 0]).double()
    rates = torch.stack([specificity, recall]).nan_to_num(0.0)
    balanced = (rates * present).sum() / present.sum().clamp(min=1)
    return {
        "balanced_accuracy": balanced,
        "precision": precision,
        "recall": recall,
        "specificity": specificity,
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "accuracy": _ratio(tp + tn, tn + fp + fn + tp),
    }


class DiagnosticMetrics(nn.Module):
    """Accumulates predictions over an epoch; ``compute()`` returns every metric and the confusion matrix.

    Under DDP the torchmetrics states are synchronised, so every rank computes the global figures.

    Args:
        threshold: probability at or above which a prediction is PNEUMONIA.
    """

    def __init__(self, threshold: float = 0.5) -> None:
        super().__init__()
        self.threshold = float(threshold)
        # Inputs come from our own sigmoid and labels; torchmetrics' argument validation would add
        # a device-to-host sync per update, which costs a GPU step more than the metric itself.
        self.stat_scores = BinaryStatScores(threshold=self.threshold, validate_args=False)
        self.auroc = BinaryAUROC(validate_args=False)

    def update(self, probabilities: torch.Tensor, targets: torch.Tensor) -> None:
        """Add a batch: ``probabilities`` ``(B,)`` in [0, 1], ``targets`` ``(B,)`` in {0, 1}."""
        targets = targets.long()
        # Decided here, not by torchmetrics (which counts only p > threshold): at the threshold
        # is PNEUMONIA, as the docs, the figures and explain.py say.
        self.stat_scores.update((probabilities >= self.threshold).long(), targets)
        self.auroc.update(probabilities, targets)

    def confusion_matrix(self) -> torch.Tensor:
        """``[[tn, fp], [fn, tp]]`` as int64."""
        tp, fp, tn, fn, _ = self.stat_scores.compute()
        return torch.stack([torch.stack([tn, fp]), torch.stack([fn, tp])]).long()

    def compute(self) -> dict[str, torch.Tensor]:
        """All of ``METRIC_NAMES`` as float64 scalars."""
        confusion = self.confusion_matrix()
        values = metrics_from_confusion(confusion)
        both_classes = bool((confusion.sum(dim=1) > 0).all())
        # AUROC is undefined with one class present; report NaN rather than torchmetrics' warning and 0.
        values["auroc"] = (
            self.auroc.compute().double()
            if both_classes
            # On the states' device: DDP on NCCL cannot all-reduce a CPU tensor.
            else torch.tensor(float("nan"), dtype=torch.float64, device=confusion.device)
        )
        return {name: values[name] for name in METRIC_NAMES}

    @property
    def updated(self) -> bool:
        """Whether any batch was counted since the last reset."""
        return self.stat_scores.update_called

    def reset(self) -> None:
        self.stat_scores.reset()
        self.auroc.reset()
