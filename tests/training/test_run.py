"""Pieces of ``training/run.py`` that need no training: the sweeper's score."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from pneumonia.training.run import _best_score


def test_the_score_of_an_unmonitored_val_metric_is_that_of_the_kept_weights():
    # The checkpoint keeps the best balanced-accuracy epoch; a sweep optimising val/auroc must be
    # told that epoch's AUROC (the weights it tests), not the last epoch's.
    trainer = SimpleNamespace(callback_metrics={"val/auroc": torch.tensor(0.47)})
    checkpoint = SimpleNamespace(
        monitor="val/balanced_accuracy", best_model_score=torch.tensor(0.9)
    )
    best_val = {"val/balanced_accuracy": 0.9, "val/auroc": 0.88}
    assert _best_score(trainer, checkpoint, "val/auroc", best_val) == pytest.approx(0.88)
    assert _best_score(trainer, checkpoint, "val/balanced_accuracy", best_val) == pytest.approx(0.9)
    assert _best_score(trainer, None, "val/auroc", best_val) == pytest.approx(0.47)  # final weights
    # NaN at the kept epoch (best_val leaves it out): no score, not the last epoch's.
    assert _best_score(trainer, checkpoint, "val/auroc", {"val/balanced_accuracy": 0.9}) is None
