"""Evaluating a trained model on a set of images outside Lightning's loops.

The test split is evaluated by ``trainer.test``; the external test sets, which a model has never
seen in any form, are evaluated here: predictions at the model's stored temperature, decisions at
its stored threshold, metrics, the confusion matrix and the calibration error. The shift suite
(:mod:`pneumonia.metrics.shift`) scores its perturbed copies of the test split with the same
:func:`batch_predictor`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from tqdm.auto import tqdm

from pneumonia import CLASS_NAMES
from pneumonia.errors import NonFiniteOutputError
from pneumonia.metrics.calibration import expected_calibration_error
from pneumonia.metrics.diagnostic import METRIC_NAMES, DiagnosticMetrics

log = logging.getLogger(__name__)

Predict = Callable[[torch.Tensor], torch.Tensor]


def batch_predictor(module: Any, device: str | torch.device | None = None) -> Predict:
    """``uint8 (b, 1, S, S) -> P(PNEUMONIA) (b,)`` float64 on the CPU, running ``module`` on
    ``device`` (float64, as the test split's metrics: see ``XrayClassifier.predict_proba``)."""
    if device is not None:
        module.to(device)
    return lambda images: module.predict_proba(images).cpu()


def predict(
    predict_batch: Predict, images: torch.Tensor, batch_size: int = 256, desc: str | None = None
) -> torch.Tensor:
    """P(PNEUMONIA) ``(N,)`` of uint8 images ``(N, 1, S, S)``, batch by batch (progress bar if ``desc``)."""
    starts = range(0, len(images), batch_size)
    if desc is not None:
        starts = tqdm(starts, desc=desc, unit="batch", leave=False)
    outputs = [predict_batch(images[start : start + batch_size]) for start in starts]
    probabilities = torch.cat(outputs) if outputs else torch.zeros(0, dtype=torch.float64)
    if not bool(probabilities.isfinite().all()):
        raise NonFiniteOutputError(
            f"the model's outputs{f' on {desc}' if desc else ''} are not finite (its weights "
            "overflow): its metrics would mean nothing; the checkpoint comes from a diverged run"
        )
    return probabilities


def evaluate_predictions(
    probabilities: torch.Tensor, targets: torch.Tensor, threshold: float
) -> dict[str, Any]:
    """Metrics, confusion matrix and calibration error of predictions at ``threshold``.

    Args:
        probabilities: ``(N,)`` P(PNEUMONIA).
        targets: ``(N,)`` labels in {0, 1}.
        threshold: at or above it, PNEUMONIA.

    Returns:
        ``{"metrics": {METRIC_NAMES: float}, "confusion_matrix": [[tn, fp], [fn, tp]],
        "images": N, "threshold": threshold, "ece": float}`` (AUROC NaN with one class present).
    """
    metrics = DiagnosticMetrics(threshold)
    if len(targets):
        metrics.update(probabilities.double(), targets.long())
    values = {name: float(value) for name, value in metrics.compute().items()}
    return {
        "metrics": values,
        "confusion_matrix": metrics.confusion_matrix().tolist(),
        "images": len(targets),
        "threshold": float(threshold),
        "ece": expected_calibration_error(probabilities, targets) if len(targets) else math.nan,
    }


def evaluate_external_sets(
    module: Any,
    datamodule: Any,
    pool: Any | None,
    batch_size: int = 256,
    device: str | torch.device | None = None,
) -> dict[str, dict[str, Any]]:
    """Evaluate ``module`` on each of ``datamodule.external_tests`` (name -> folder).

    Args:
        pool: the data module of the training pool ``module`` came from, set up, to look for its
            images among the external ones; None where it is not at hand (copies are n/a).

    Returns:
        name -> :func:`evaluate_predictions` entry, plus ``"folder"``, ``"skipped"`` (files that
        could not be read, counted) and ``"copies_of_pool_images"`` (images equal, pixel for pixel,
        to one of the training pool's; None without a pool).
    """
    predict_batch = batch_predictor(module, device)
    results: dict[str, dict[str, Any]] = {}
    for name, folder in datamodule.external_tests.items():
        external = datamodule.external_test_set(name)
        images, targets = external.split_arrays("test")
        probabilities = predict(predict_batch, images, batch_size, desc=f"external {name}")
        result = evaluate_predictions(probabilities, targets, module.threshold)
        result["folder"] = str(folder)
        result["skipped"] = int((external.splits == "skipped").sum()) + len(external.skipped_files)
        copies = pool.copies_in_pool(external) if pool is not None else []
        result["copies_of_pool_images"] = len(copies) if pool is not None else None
        if copies:
            log.warning(
                "%d of the %d images of external test set %s are copies of training-pool images "
                "(pixel for pixel at %d px, e.g. %s = %s): its figures are partly in-pool. Remove "
                "them from %s",
                len(copies),
                result["images"],
                name,
                datamodule.image_size,
                *copies[0],
                folder,
            )
        results[name] = result
        log.info(
            "external test set %s (%d images, %s): %s",
            name,
            result["images"],
            folder,
            ", ".join(f"{k} {v:.4f}" for k, v in result["metrics"].items()),
        )
        warn_if_one_class(f"external test set {name}", result["confusion_matrix"])
    return results


def warn_if_one_class(what: str, confusion_matrix: Sequence[Sequence[int]]) -> None:
    """Warn that an evaluated set of one class (rows of ``confusion_matrix``: true classes)
    cannot rank models: its balanced accuracy is that class's recall alone, which a model calling
    every image that class maximises."""
    present = [CLASS_NAMES[k] for k, row in enumerate(confusion_matrix) if sum(row) > 0]
    if len(present) == 1:
        (only,) = present
        log.warning(
            "%s holds %s images only: its balanced accuracy is their recall alone, which a model "
            "calling every image %s maximises; specificity or recall and AUROC are n/a. Rank "
            "models on a set with both classes",
            what,
            only,
            only,
        )


def external_scalars(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """``external/<name>/<metric>`` (and ``/ece``) of :func:`evaluate_external_sets`' results."""
    return {
        f"external/{name}/{metric}": value
        for name, result in results.items()
        for metric, value in {**result["metrics"], "ece": result["ece"]}.items()
    }


def log_external_results(
    loggers: Iterable[Logger], results: dict[str, dict[str, Any]], step: int
) -> None:
    """Log :func:`external_scalars` at ``step`` to every logger."""
    values = external_scalars(results)
    for logger in loggers:
        logger.log_metrics(values, step=step)
        logger.save()


def epoch_metrics_step(trainer: Any) -> int:
    """The step Lightning logs this stage's epoch metrics at: within a fit, validation's is the
    last training batch's (one below ``global_step``), and a test's is ``global_step``.

    A figure of an epoch belongs at its metrics' step. At ``global_step`` a validation figure would
    lie one step past its checkpoint, and a resume from that checkpoint purges the step
    (:mod:`pneumonia.training.loggers`): TensorBoard lost the epoch's confusion matrix and maps.
    """
    step = int(trainer.fit_loop.epoch_loop._batches_that_stepped)
    # ddp_spawn tests in fresh workers whose step is 0: loggers then hold the fitted step as a floor.
    # (fast_dev_run's DummyLogger answers any attribute with a function: only numbers count.)
    floors = [getattr(logger, "step_floor", 0) for logger in trainer.loggers]
    return max([step, *(int(f) for f in floors if isinstance(f, int | float))])


def log_figure(loggers: Iterable[Logger], tag: str, figure: Any, step: int) -> None:
    """Add a matplotlib figure to every TensorBoard logger."""
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_figure(tag, figure, step)


def external_metric_names(names: Iterable[str]) -> list[str]:
    """``external/<name>/<metric>`` for every metric a run reports on each external set."""
    return [f"external/{name}/{metric}" for name in names for metric in (*METRIC_NAMES, "ece")]
