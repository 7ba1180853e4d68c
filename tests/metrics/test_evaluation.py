"""Evaluating a checkpoint outside the test loop: external sets, the shift suite and predict.py
score images as the test split does."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from pneumonia.metrics.evaluation import batch_predictor, evaluate_predictions, predict
from pneumonia.metrics.shift import run_shift_suite
from pneumonia.model.classifier import XrayClassifier

NET = {
    "_target_": "pneumonia.model.study_cnn.StudyCNN",
    "image_size": 32,
    "channels": [4, 8, 8],
    "hidden_features": 8,
}


def test_a_small_temperature_does_not_tie_images_outside_the_test_loop():
    """A temperature fitted on well-separated validation can be small; then float32 probabilities
    saturate at exactly 1.0 and tie images the test split's float64 ones rank apart, so the
    external sets, the shift suite's clean row and predict.py reported another AUROC than the
    test split for the same images."""
    torch.manual_seed(0)
    module = XrayClassifier(net=NET, optimizer={"_target_": "torch.optim.Adam"}, image_size=32)
    last = [layer for layer in module.net.modules() if isinstance(layer, torch.nn.Linear)][-1]
    images = torch.randint(0, 256, (96, 1, 32, 32), dtype=torch.uint8)
    with torch.no_grad():  # logits spread over a few units around 0
        last.weight.mul_(200.0)
        last.bias.sub_(module.eval()(images).median())
    module.set_operating_point(0.5, 0.05)
    logits = module(images).double().detach()
    noisy = logits + torch.randn(len(logits), generator=torch.Generator().manual_seed(1)).double()
    targets = (noisy > noisy.median()).long()
    # What the test split reports (its probabilities are float64), and what float32 would give.
    expected = roc_auc_score(targets.numpy(), module.probabilities_from_logits(logits).numpy())
    float32 = roc_auc_score(targets.numpy(), torch.sigmoid(logits.float() / 0.05).numpy())
    assert abs(float32 - expected) > 1e-3  # the case at hand

    probabilities = predict(batch_predictor(module), images, batch_size=32)
    external = evaluate_predictions(probabilities, targets, 0.5)
    assert external["metrics"]["auroc"] == pytest.approx(expected, abs=1e-6)
    assert probabilities.dtype == torch.float64
    shift = run_shift_suite(
        batch_predictor(module), images, targets, 0.5, perturbations=["noise"], severities=[1],
        progress=False,
    )  # fmt: skip
    assert shift.clean["auroc"] == pytest.approx(expected, abs=1e-6)
    single = np.array([float(module.predict_proba(image)) for image in images])
    assert roc_auc_score(targets.numpy(), single) == pytest.approx(expected, abs=1e-6)


def test_figures_follow_the_metrics_step_and_a_loggers_floor_but_not_a_dummy_logger():
    from types import SimpleNamespace

    from lightning.pytorch.loggers.logger import DummyLogger

    from pneumonia.metrics.evaluation import epoch_metrics_step

    def trainer(step, *loggers):
        loop = SimpleNamespace(epoch_loop=SimpleNamespace(_batches_that_stepped=step))
        return SimpleNamespace(fit_loop=loop, loggers=list(loggers))

    assert epoch_metrics_step(trainer(7)) == 7
    # ddp_spawn's test workers start at step 0; the logger holds the fitted step as a floor.
    assert epoch_metrics_step(trainer(0, SimpleNamespace(step_floor=12))) == 12
    # fast_dev_run's DummyLogger answers every attribute (step_floor too) with a function.
    assert epoch_metrics_step(trainer(3, DummyLogger())) == 3
