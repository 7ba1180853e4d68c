"""What a run leaves for people: the metric table, ``test_metrics.json``, the confusion matrix and
the reliability diagram as PNGs."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from lightning.pytorch.callbacks import Callback

from pneumonia import CLASS_NAMES
from pneumonia.errors import NonFiniteOutputError
from pneumonia.files import save_figure, write_atomic
from pneumonia.metrics.diagnostic import METRIC_NAMES


def to_json(report: dict[str, Any]) -> str:
    """Strict JSON (any parser reads it): an undefined value (NaN, e.g. AUROC of one class) is null."""

    def strict(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: strict(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [strict(v) for v in value]
        return value

    return json.dumps(strict(report), indent=2, allow_nan=False) + "\n"


def format_metrics_table(metrics: dict[str, float]) -> str:
    """A small fixed-width table of ``METRIC_NAMES`` (missing ones are skipped)."""
    rows = [(name, metrics[name]) for name in METRIC_NAMES if name in metrics]
    width = max(len(name) for name, _ in rows)
    lines = [f"{'test':<{width}}   value", "-" * (width + 9)]
    lines += [
        f"{name:<{width}}   " + ("   n/a" if value is None or value != value else f"{value:6.4f}")
        for name, value in rows
    ]
    return "\n".join(lines)


def write_test_report(output_dir: str | Path, report: dict[str, Any]) -> Path:
    """Write ``test_metrics.json`` and ``test_confusion_matrix.png`` into ``output_dir``."""
    from pneumonia.metrics.figures import confusion_matrix_figure

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    json_path = output_dir / "test_metrics.json"
    write_atomic(json_path, to_json(report))
    figure = confusion_matrix_figure(np.array(report["confusion_matrix"]), CLASS_NAMES, "test")
    save_figure(figure, output_dir / "test_confusion_matrix.png")
    import matplotlib.pyplot as plt

    plt.close(figure)
    return json_path


def write_reliability_diagram(
    output_dir: str | Path, probabilities: np.ndarray, targets: np.ndarray
) -> Path:
    """Write ``test_reliability.png``: observed P(PNEUMONIA) against predicted, per bin."""
    from pneumonia.metrics.calibration import reliability_diagram

    figure = reliability_diagram(probabilities, targets, title="test, calibrated")
    return save_figure(figure, Path(output_dir) / "test_reliability.png")


class TestReportWriter(Callback):
    """Writes ``test_metrics.json`` and the confusion matrix where the test ran (rank zero).

    Under ``ddp_spawn`` the test runs in worker processes whose module never comes back, so the
    report is written there, not by the launching process.
    """

    def __init__(self, output_dir: str | Path) -> None:
        self.output_dir = Path(output_dir)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        report = getattr(pl_module, "test_report", None)
        if report is None or not trainer.is_global_zero:
            return
        loss = trainer.callback_metrics.get("test/loss")
        if loss is not None and not math.isfinite(float(loss)):
            raise NonFiniteOutputError(
                f"the test loss is {float(loss)}: the network's outputs are not finite (its weights "
                f"overflow), so its metrics mean nothing and no {self.output_dir / 'test_metrics.json'} "
                "is written; the checkpoint comes from a diverged run"
            )
        extra = {
            "checkpoint": str(trainer.ckpt_path) if trainer.ckpt_path else None,
            "class_weights": pl_module.hparams.get("class_weights"),
        }
        write_test_report(self.output_dir, {**report, **extra})
        outputs = getattr(pl_module, "test_outputs", None)
        if outputs is not None and len(outputs[1]):
            write_reliability_diagram(self.output_dir, *outputs)


def retire_test_report(output_dir: str | Path) -> None:
    """Rename an earlier ``test_metrics.json``, its figures and the shift suite's files to
    ``<name>.previous.<suffix>`` (``test_metrics.previous.json``).

    A folder that is fitted again (a resume, a repeated run) must not keep a report that could be
    read as the new fit's result if the new fit fails.
    """
    names = ("test_metrics.json", "test_confusion_matrix.png", "test_reliability.png")
    for name in (*names, "shift_suite.csv", "shift_suite.md", "shift_suite.png"):
        path = Path(output_dir) / name
        if path.exists():
            path.replace(path.with_name(name.replace(".", ".previous.", 1)))


def add_to_test_report(output_dir: str | Path, extra: dict[str, Any]) -> dict[str, Any]:
    """Merge ``extra`` into ``test_metrics.json`` (created if absent) and return the whole report."""
    path = Path(output_dir) / "test_metrics.json"
    report = {**(json.loads(path.read_text()) if path.exists() else {}), **extra}
    write_atomic(path, to_json(report))
    return report
