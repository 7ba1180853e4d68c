"""run_status.json says how a run ended, and survives being read while it is written."""

from __future__ import annotations

import json

import pytest

from pneumonia.training.status import (
    STATUS_FILE,
    RunStatus,
    error_line,
    metric_mode,
    read_status,
)


def test_a_run_is_running_until_it_ends_then_completed_with_its_score(tmp_path):
    status = RunStatus(tmp_path, ["optimizer=sgd"], "val/balanced_accuracy")
    record = read_status(tmp_path)
    assert record["status"] == "running" and record["finished"] is None
    assert record["overrides"] == ["optimizer=sgd"] and record["mode"] == "max"
    status.update(epochs=3, best_val={"val/auroc": 0.9})
    status.end("completed", score=0.91)
    record = read_status(tmp_path)
    assert record["status"] == "completed" and record["score"] == 0.91 and record["epochs"] == 3
    assert record["finished"] is not None and record["wall_time_s"] >= 0
    assert not list(tmp_path.glob("*.partial"))


def test_a_failed_run_records_the_first_line_of_its_error(tmp_path):
    status = RunStatus(tmp_path, [], "val/loss")
    status.end("failed", error=ValueError("lr was negative\nsecond line"))
    record = read_status(tmp_path)
    assert record["status"] == "failed" and record["error"] == "ValueError: lr was negative"
    assert record["mode"] == "min" and record["score"] is None


def test_non_finite_scores_and_tensors_are_stored_as_json(tmp_path):
    torch = pytest.importorskip("torch")
    status = RunStatus(tmp_path, [], "val/auroc")
    status.update(best_val={"val/auroc": torch.tensor(0.75), "val/loss": float("nan")})
    status.end("completed", score=float("inf"))
    record = json.loads((tmp_path / STATUS_FILE).read_text())  # strict JSON: no NaN tokens
    assert record["best_val"] == {"val/auroc": 0.75, "val/loss": None} and record["score"] is None


@pytest.mark.parametrize("content", ["", "{not json", "[1, 2]"])
def test_an_unreadable_status_reads_as_none(tmp_path, content):
    (tmp_path / STATUS_FILE).write_text(content)
    assert read_status(tmp_path) is None
    assert read_status(tmp_path / "missing") is None


def test_metric_modes_and_error_lines():
    assert metric_mode("val/loss") == metric_mode("test/ece") == "min"
    assert metric_mode("external/x/auroc") == metric_mode("shift/robustness") == "max"
    assert error_line(KeyboardInterrupt()) == "KeyboardInterrupt"
