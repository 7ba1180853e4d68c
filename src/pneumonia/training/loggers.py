"""Loggers whose history survives a resume.

Resuming a run in its own folder (``run_dir=<run> ckpt_path=last``) restarts after the last step
``S`` its checkpoint holds (``S = G - 1`` for a checkpoint at global step ``G``: the next batch
logs at step ``G``), but the interrupted process may have logged beyond it. Lightning's loggers
get this wrong in two ways, fixed here for a logger told :meth:`continue_after` ``(S)``:

- ``CSVLogger`` deletes the earlier ``metrics.csv`` when it writes into an existing folder. Here
  the rows up to step ``S`` are kept and the new rows follow them.
- ``TensorBoardLogger`` appends a new event file, so steps after ``S`` show twice. Here the new
  writer starts with TensorBoard's ``purge_step=S+1``, which makes readers drop the earlier
  events from step ``S+1`` on.

And one more for ``ddp_spawn``: the test after fitting runs in fresh worker processes whose step
is 0, and TensorBoard takes a step going back for a restart and hides the training curves after
it. A logger given :attr:`ContinuingTensorBoardLogger.step_floor` never logs below it.
"""

from __future__ import annotations

import csv
import os
import sys
from collections.abc import Iterable
from typing import Any

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from pneumonia.files import written_aside


def continue_logs(loggers: Iterable[Any], after_step: int) -> None:
    """Tell every logger that can continue a history to drop what was logged after ``after_step``."""
    for logger in loggers:
        continue_after = getattr(logger, "continue_after", None)
        if callable(continue_after):
            continue_after(after_step)


class ContinuingTensorBoardLogger(TensorBoardLogger):
    """``TensorBoardLogger`` that can continue a run's event history without repeated steps."""

    #: No metric is logged at a step below this (the fitted step, for a test after fitting).
    step_floor: int = 0

    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        if step is not None:
            step = max(int(step), self.step_floor)
        super().log_metrics(metrics, step)

    def continue_after(self, step: int) -> None:
        """Drop events after global step ``step`` written by an interrupted process."""
        if self._experiment is not None:
            raise RuntimeError("continue_after() must be called before anything is logged")
        self._kwargs["purge_step"] = int(step) + 1

    def keep_history(self) -> None:
        """Writers created from now on append: ddp_spawn's test workers must not purge the fit."""
        self._kwargs.pop("purge_step", None)


class ContinuingCSVLogger(CSVLogger):
    """``CSVLogger`` that keeps the rows of ``metrics.csv`` up to a step when it resumes."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._keep_until_step: int | None = None

    def continue_after(self, step: int) -> None:
        """Keep the existing rows logged at global steps up to ``step``; later ones are dropped."""
        if self._experiment is not None:
            raise RuntimeError("continue_after() must be called before anything is logged")
        self._keep_until_step = int(step)

    def keep_history(self) -> None:
        """Writers created from now on keep every row: ddp_spawn's test workers start from a copy
        of this logger, and Lightning's writer would delete the fit's ``metrics.csv``."""
        self._keep_until_step = sys.maxsize

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuingWriter(self.log_dir, self._keep_until_step)
        return self._experiment


class _ContinuingWriter(ExperimentWriter):
    def __init__(self, log_dir: str, keep_until_step: int | None) -> None:
        self._keep_until_step = keep_until_step
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        if self._keep_until_step is None or not os.path.isfile(self.metrics_file_path):
            super()._check_log_dir_exists()
            return
        with open(self.metrics_file_path, newline="") as f:
            reader = csv.DictReader(f)
            header = list(reader.fieldnames or [])
            rows = [row for row in reader if _step_of(row) <= self._keep_until_step]
        self._write_rows(header, rows)
        self.metrics_keys = header

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        # Lightning truncates metrics.csv and writes it again when a new column appears (the
        # first epoch-end metrics, logged right after a checkpoint is saved): a kill in between
        # lost every earlier row. Written aside and renamed into place instead, under the file's
        # columns and the new ones (a writer that did not write the file knows only its own).
        with open(self.metrics_file_path, newline="") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            self.metrics_keys = sorted(set(fieldnames).union(reader.fieldnames or []))
        self._write_rows(self.metrics_keys, rows)

    def _write_rows(self, fieldnames: list[str], rows: list[dict[str, str]]) -> None:
        """Replace ``metrics.csv`` with ``rows``: written aside, then renamed into place."""
        with written_aside(self.metrics_file_path) as partial, partial.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fieldnames)
            writer.writeheader()
            writer.writerows(rows)


def _step_of(row: dict[str, str]) -> float:
    try:
        return float(row.get("step") or "nan")
    except ValueError:
        return float("nan")
