"""The test report is written only for a network whose outputs mean something."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from pneumonia.errors import NonFiniteOutputError
from pneumonia.metrics.report import TestReportWriter

REPORT = {"metrics": {"balanced_accuracy": 0.5}, "confusion_matrix": [[1, 0], [1, 0]], "images": 2}


def _end_test(tmp_path, loss):
    trainer = SimpleNamespace(
        is_global_zero=True, callback_metrics={"test/loss": torch.tensor(loss)}, ckpt_path=None
    )
    module = SimpleNamespace(test_report=REPORT, hparams={"class_weights": None})
    TestReportWriter(tmp_path).on_test_end(trainer, module)


@pytest.mark.parametrize("loss", [float("nan"), float("inf")])
def test_a_non_finite_test_loss_writes_no_report(tmp_path, loss):
    with pytest.raises(NonFiniteOutputError, match="outputs are not finite"):
        _end_test(tmp_path, loss)
    assert not list(tmp_path.iterdir())


def test_a_finite_test_loss_writes_the_report(tmp_path):
    _end_test(tmp_path, 0.7)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "test_confusion_matrix.png",
        "test_metrics.json",
    ]


def test_reports_are_strict_json_with_undefined_values_as_null(tmp_path):
    import json
    import math

    from pneumonia.metrics.report import add_to_test_report, format_metrics_table

    add_to_test_report(tmp_path, {"metrics": {"auroc": math.nan, "recall": 1.0}, "x": [math.inf]})
    text = (tmp_path / "test_metrics.json").read_text()
    report = json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in the JSON"))
    assert report["metrics"]["auroc"] is None and report["x"] == [None]
    assert "n/a" in format_metrics_table(report["metrics"])


def test_a_refit_retires_every_file_of_the_earlier_report(tmp_path):
    # The reliability diagram and the shift suite's table, figure and CSV stayed in place when a
    # refit failed, beside test_metrics.previous.json, passing for the new fit's.
    from pneumonia.metrics.report import retire_test_report

    names = ["test_metrics.json", "test_confusion_matrix.png", "test_reliability.png",
             "shift_suite.csv", "shift_suite.md", "shift_suite.png", "external_site.csv"]  # fmt: skip
    for name in names:
        (tmp_path / name).write_text(name)
    retire_test_report(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["external_site.csv"] + [name.replace(".", ".previous.", 1) for name in names[:-1]]
    )
