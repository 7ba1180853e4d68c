"""How a model holds up outside its training pool: the external test sets and the shift suite,
measured after a fit or on any checkpoint, as the run's config asks (``data.external_tests``,
``shift_suite``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig

from pneumonia.data.datamodule import ChestXrayDataModule
from pneumonia.files import save_figure, write_atomic
from pneumonia.metrics.evaluation import (
    batch_predictor,
    evaluate_external_sets,
    external_scalars,
    log_external_results,
    log_figure,
)
from pneumonia.metrics.report import add_to_test_report
from pneumonia.model.classifier import XrayClassifier


def measures_outside_pool(cfg: DictConfig, datamodule: ChestXrayDataModule) -> bool:
    return bool(datamodule.external_tests) or bool(cfg.get("shift_suite", {}).get("enabled"))


def measure_outside_pool(
    cfg: DictConfig,
    module: XrayClassifier,
    datamodule: ChestXrayDataModule,
    pool: ChestXrayDataModule | None,
    loggers: list[Logger],
    output_dir: Path,
    step: int,
    device: torch.device | None = None,
) -> dict[str, float]:
    """Evaluate on the external test sets and run the shift suite, as configured.

    ``pool``: the module's training pool, to look for its images among the external ones (None:
    not at hand). The shift suite perturbs ``datamodule``'s test split. ``device``: the trainer's;
    only a CUDA device is used, the CPU path scores where the module already is.

    Results go into ``test_metrics.json`` (``external``, ``shift_suite``), the loggers
    (``external/<name>/<metric>``, ``shift/robustness``) and, for the shift suite, a table and a
    plot beside it. Returns every scalar logged, by name, for the sweeper.
    """
    module.eval()
    device = device if device is not None and device.type == "cuda" else None
    scalars: dict[str, float] = {}
    extra: dict[str, Any] = {}
    if datamodule.external_tests:
        results = evaluate_external_sets(
            module, datamodule, pool, batch_size=max(datamodule.batch_size, 64), device=device
        )
        log_external_results(loggers, results, step)
        extra["external"] = results
        scalars.update(external_scalars(results))
    suite_cfg = cfg.get("shift_suite") or {}
    if suite_cfg.get("enabled"):
        from pneumonia.metrics.shift import run_shift_suite, shift_suite_figure

        images, targets = datamodule.split_arrays("test")
        threshold = suite_cfg.get("threshold")
        result = run_shift_suite(
            batch_predictor(module, device),
            images,
            targets,
            module.threshold if threshold is None else float(threshold),
            perturbations=suite_cfg.get("perturbations"),
            severities=tuple(suite_cfg.get("severities") or (1, 2, 3)),
            batch_size=int(suite_cfg.get("batch_size") or 256),
            seed=int(suite_cfg.get("seed") or 0),
        )
        result.to_csv(output_dir / "shift_suite.csv")
        write_atomic(output_dir / "shift_suite.md", result.to_markdown() + "\n")
        figure = shift_suite_figure(result)
        save_figure(figure, output_dir / "shift_suite.png", dpi=120)
        log_figure(loggers, "shift/suite", figure, step)
        for logger in loggers:
            logger.log_metrics({"shift/robustness": result.score}, step=step)
            logger.save()
        extra["shift_suite"] = result.to_dict()
        scalars["shift/robustness"] = result.score
        print("\n" + result.to_markdown() + "\n")
        print(f"shift suite: {output_dir / 'shift_suite.md'}, {output_dir / 'shift_suite.png'}")
    add_to_test_report(output_dir, extra)
    return scalars
