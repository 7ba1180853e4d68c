"""A resumed run's logs continue where the checkpoint stopped: no lost rows, no repeated steps."""

from __future__ import annotations

import csv
import pickle

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pneumonia.training.loggers import ContinuingCSVLogger, ContinuingTensorBoardLogger


def _log_steps(logger, steps, value):
    for step in steps:
        logger.log_metrics({"val/score": value + step, "epoch": step // 10}, step=step)
    logger.save()
    logger.finalize("success")


def test_csv_logger_keeps_the_rows_up_to_the_checkpoint(tmp_path):
    _log_steps(ContinuingCSVLogger(tmp_path, name="csv", version=""), range(0, 25, 5), 0.0)
    resumed = ContinuingCSVLogger(tmp_path, name="csv", version="")
    resumed.continue_after(10)  # the checkpoint was taken at step 10; 15 and 20 are lost work
    _log_steps(resumed, range(15, 30, 5), 100.0)
    with open(tmp_path / "csv" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(int(r["step"]), float(r["val/score"])) for r in rows] == [
        (0, 0.0), (5, 5.0), (10, 10.0), (15, 115.0), (20, 120.0), (25, 125.0),
    ]  # fmt: skip


def test_csv_logger_that_is_not_resuming_starts_afresh(tmp_path):
    _log_steps(ContinuingCSVLogger(tmp_path, name="csv", version=""), range(3), 0.0)
    _log_steps(ContinuingCSVLogger(tmp_path, name="csv", version=""), range(2), 50.0)
    with open(tmp_path / "csv" / "metrics.csv", newline="") as f:
        assert [float(r["val/score"]) for r in csv.DictReader(f)] == [50.0, 51.0]


def test_a_copy_of_the_logger_after_the_fit_adds_its_test_rows_to_the_fits(tmp_path):
    """ddp_spawn tests in worker processes, each with a fresh copy of the fitted logger."""
    fitted = ContinuingCSVLogger(tmp_path, name="csv", version="")
    _log_steps(fitted, range(0, 15, 5), 0.0)
    fitted.keep_history()
    worker = pickle.loads(pickle.dumps(fitted))
    worker.log_metrics({"test/score": 0.9}, step=10)
    worker.save()
    with open(tmp_path / "csv" / "metrics.csv", newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert set(reader.fieldnames) == {"epoch", "step", "test/score", "val/score"}
    assert [r["val/score"] for r in rows] == ["0.0", "5.0", "10.0", ""]
    assert rows[-1]["test/score"] == "0.9"


def test_tensorboard_has_each_step_once_after_a_resume(tmp_path):
    _log_steps(ContinuingTensorBoardLogger(tmp_path, name="tb", version=""), range(0, 25, 5), 0.0)
    resumed = ContinuingTensorBoardLogger(tmp_path, name="tb", version="")
    resumed.continue_after(10)
    _log_steps(resumed, range(15, 30, 5), 100.0)
    events = EventAccumulator(str(tmp_path / "tb")).Reload()
    points = [(e.step, e.value) for e in events.Scalars("val/score")]
    assert points == [(0, 0.0), (5, 5.0), (10, 10.0), (15, 115.0), (20, 120.0), (25, 125.0)]


def test_a_kill_while_a_new_column_is_added_keeps_every_earlier_row(tmp_path, monkeypatch):
    logger = ContinuingCSVLogger(tmp_path, name="csv", version="")
    logger.log_metrics({"val/balanced_accuracy": 0.9}, step=20)
    logger.save()

    def killed(self, rows):  # the process dies while the file is being written again
        raise KeyboardInterrupt

    logger.log_metrics({"train/loss_epoch": 0.3}, step=20)  # a new column: the file is rewritten
    monkeypatch.setattr(csv.DictWriter, "writerows", killed)
    with pytest.raises(KeyboardInterrupt):
        logger.save()
    monkeypatch.undo()
    with open(tmp_path / "csv" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["val/balanced_accuracy"] for row in rows] == ["0.9"]
