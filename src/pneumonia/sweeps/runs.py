"""What a run folder recorded, read leniently: status, overrides, score and metrics.

What a run folder holds (any file or field may be missing; older runs lack ``run_status.json``):
``run_status.json`` (status, error, overrides, optimized metric and mode, score, epochs, wall time,
``best_val``), ``.hydra/overrides.yaml`` and ``.hydra/config.yaml`` (the overrides and the optimized
metric when the status lacks them), ``test_metrics.json`` (test, external and shift-suite metrics)
and ``csv/metrics.csv`` (the best epoch's validation metrics when the status lacks them).
:func:`find_run_folders` finds them below a folder, :func:`read_run` reads one into a :class:`Run`;
a missing or broken file leaves fields empty, it never raises.

Only the standard library and PyYAML are imported here, as in :mod:`pneumonia.sweeps.summary`.
"""

from __future__ import annotations

import csv
import datetime
import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pneumonia.hydra_hooks import override_key
from pneumonia.training.status import INTERRUPTED, RUNNING, STATUS_FILE, metric_mode, run_is_live

HYDRA_DIR = ".hydra"
TEST_METRICS_FILE = "test_metrics.json"
CSV_METRICS_FILE = Path("csv") / "metrics.csv"
# A "running" record of a run from before the run lock: nothing tells a killed run from a live one.
RUNNING_OR_INTERRUPTED = "running or interrupted"
# The status of a run folder without run_status.json (a run from before it existed).
UNKNOWN = "unknown"
# Where a run lives or resumes from, not what it trains: not a column, and no reason to keep two
# seeds of one configuration apart.
LOCATION_KEYS = frozenset({"run_dir", "ckpt_path"})
DEFAULT_METRIC = "val/balanced_accuracy"
MODES = ("max", "min")


def is_run_folder(folder: Path) -> bool:
    """A run folder has a ``run_status.json`` or a Hydra record (``.hydra/config.yaml``)."""
    return (folder / STATUS_FILE).is_file() or (folder / HYDRA_DIR / "config.yaml").is_file()


def natural_key(text: str) -> list[tuple[int, int, str]]:
    # Job 10 after job 9, not after job 1.
    return [
        (0, int(part), "") if part.isdigit() else (1, 0, part)
        for part in re.split(r"(\d+)", text)
        if part
    ]


def find_run_folders(root: str | Path) -> list[Path]:
    """Every run folder at or below ``root``, in natural order of their paths.

    A run's own subfolders (checkpoints, logs, ``.hydra``) are not searched, and neither are
    hidden folders. Symbolic links to folders are followed (a folder of links to chosen runs is a
    comparison too), each real folder once, so a link loop ends.
    """
    root = Path(root)
    found: list[Path] = []
    seen: set[Path] = set()
    pending = [root]
    while pending:
        folder = pending.pop()
        try:
            real = folder.resolve()
        except (OSError, RuntimeError):
            continue
        if real in seen:
            continue
        seen.add(real)
        try:
            is_run = is_run_folder(folder)
        except OSError:  # a folder this user may not read: left out, the rest is summarised
            continue
        if is_run:
            found.append(folder)
            continue
        try:
            children = [
                child
                for child in folder.iterdir()
                if not child.name.startswith(".") and child.is_dir()
            ]
        except OSError:
            continue
        pending.extend(children)
    return sorted(found, key=lambda path: natural_key(_relative(path, root)))


def _relative(folder: Path, root: Path) -> str:
    relative = folder.relative_to(root).as_posix()
    return relative if relative else "."


def _number(value: Any) -> float | None:
    """A finite float, or None for anything else (null, NaN, text, booleans)."""
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):  # an integer of 400 digits overflows
        return None
    return number if math.isfinite(number) else None


# A run's records are a few KB; anything far larger is not one of them, and is not read.
MAX_RECORD_BYTES = 16 * 2**20


def _read_record(path: Path) -> str | None:
    """The text of a run's record file; None when absent or not a regular file (a FIFO would
    block for ever).

    Raises:
        OSError: unreadable, or over :data:`MAX_RECORD_BYTES`.
        UnicodeDecodeError: not UTF-8.
    """
    if not path.is_file():
        return None
    size = path.stat().st_size
    if size > MAX_RECORD_BYTES:
        raise OSError(f"{size:,} bytes, more than a run record holds")
    return path.read_text()


def _read_json(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """``(content, None)``, ``(None, None)`` when absent, ``(None, problem)`` when unreadable."""
    try:
        text = _read_record(path)
        if text is None:
            return None, None
        content = json.loads(text)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as error:
        # RecursionError: nesting deeper than the parser's stack, as a crafted file can have.
        return None, f"{path.name} unreadable: {type(error).__name__}: {_first_line(str(error))}"
    if not isinstance(content, dict):
        return None, f"{path.name} unreadable: not a JSON object"
    return content, None


def _read_yaml(path: Path) -> Any:
    try:
        text = _read_record(path)
        return None if text is None else yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, yaml.YAMLError, RecursionError):
        return None


def _first_line(text: str) -> str:
    lines = str(text).strip().splitlines()
    return lines[0].strip() if lines else ""


def parse_override(text: str) -> tuple[str, str]:
    """``"+optimizer.lr=0.01"`` -> ``("optimizer.lr", "0.01")``: the key without ``+``/``++``/``~``,
    the value as written (``(deleted)`` for a ``~key`` deletion)."""
    text = str(text).strip()
    value = text.partition("=")[2]
    if text.startswith("~"):
        value = "(deleted)"
    return override_key(text), value.strip()


def parse_overrides(overrides: Iterable[Any]) -> dict[str, str]:
    """Override strings -> ``{key: value}`` in their order, without :data:`LOCATION_KEYS`."""
    parsed: dict[str, str] = {}
    for text in overrides:
        key, value = parse_override(text)
        if key and key not in LOCATION_KEYS:
            parsed[key] = value
    return parsed


@dataclass
class Run:
    """What one run folder recorded, read leniently.

    Attributes:
        folder: relative to the summarised folder (``.`` for the folder itself).
        status: ``completed``, ``failed``, ``running``, ``interrupted`` (killed: no process holds
            its lock), ``running or interrupted`` (a run from before the lock), ``unknown`` (no
            ``run_status.json``), or another status as recorded.
        error: the first line of the error (or of why a record could not be read).
        overrides: ``{key: value}`` of the run's task overrides.
        optimized_metric, mode, recorded_score: what the sweeper optimised, and what it got.
        values: every metric found, by column name: ``val_best/<m>``, ``val_last/<m>``,
            ``test/<m>``, ``external/<set>/<m>``, ``shift/robustness``.
        shift_suite: the perturbed sets ``shift/robustness`` averages over, in words (``None``
            where the run has no shift suite or its rows cannot be read).
    """

    folder: str
    status: str = UNKNOWN
    error: str | None = None
    overrides: dict[str, str] = field(default_factory=dict)
    optimized_metric: str | None = None
    mode: str | None = None
    recorded_score: float | None = None
    epochs: int | None = None
    wall_time_s: float | None = None
    values: dict[str, float] = field(default_factory=dict)
    shift_suite: str | None = None

    def value(self, metric: str) -> float | None:
        """``metric``'s value for this run: the score the sweeper got when ``metric`` is the one it
        optimised, else the column of that name (``val/<m>`` is the best epoch's ``val_best/<m>``)."""
        if metric == self.optimized_metric and self.recorded_score is not None:
            return self.recorded_score
        if metric in self.values:
            return self.values[metric]
        if metric.startswith("val/"):
            return self.values.get("val_best/" + metric.removeprefix("val/"))
        return None


def _running_status(folder: Path) -> str:
    """``running`` while a process holds the run's lock, ``interrupted`` once none does (a killed
    run); ``running or interrupted`` for runs from before the lock."""
    live = run_is_live(folder)
    return RUNNING_OR_INTERRUPTED if live is None else RUNNING if live else INTERRUPTED


def read_run(folder: str | Path, root: str | Path | None = None) -> Run:
    """Read one run folder; a missing or broken file leaves its fields empty, it never raises."""
    folder = Path(folder)
    run = Run(folder=_relative(folder, Path(root)) if root is not None else str(folder))
    record, problem = _read_json(folder / STATUS_FILE)
    record = record or {}
    problems = [problem] if problem else []

    status = record.get("status")
    if isinstance(status, str) and status:
        run.status = _running_status(folder) if status == RUNNING else status
    error = record.get("error")
    if isinstance(error, str) and error.strip():
        problems.insert(0, _first_line(error))
    run.error = "; ".join(problems) or None

    overrides = record.get("overrides")
    if not isinstance(overrides, list):
        # The top-level record is the run's own; reruns put theirs in .hydra/rerun-<time>/.
        overrides = _read_yaml(folder / HYDRA_DIR / "overrides.yaml")
    if isinstance(overrides, list):
        run.overrides = parse_overrides(overrides)

    metric = record.get("optimized_metric")
    if not isinstance(metric, str) or not metric:
        config = _read_yaml(folder / HYDRA_DIR / "config.yaml")
        metric = config.get("optimized_metric") if isinstance(config, dict) else None
    run.optimized_metric = metric if isinstance(metric, str) and metric else None
    run.mode = record.get("mode") if record.get("mode") in MODES else None
    run.recorded_score = _number(record.get("score"))
    run.epochs = _integer(record.get("epochs"))
    run.wall_time_s = _number(record.get("wall_time_s"))
    if run.wall_time_s is None:
        run.wall_time_s = _seconds_between(record.get("started"), record.get("finished"))

    best_val = record.get("best_val")
    if isinstance(best_val, dict) and best_val:
        run.values.update(_validation_values(best_val, "val_best"))
        if isinstance(record.get("last_val"), dict):
            run.values.update(_validation_values(record["last_val"], "val_last"))
    else:
        from_csv = _validation_from_csv(folder / CSV_METRICS_FILE, run.optimized_metric, run.mode)
        if from_csv is not None:
            best, last, epochs = from_csv
            run.values.update(_validation_values(best, "val_best"))
            run.values.update(_validation_values(last, "val_last"))
            if run.epochs is None:
                run.epochs = epochs
    report, _ = _read_json(folder / TEST_METRICS_FILE)
    run.values.update(_test_values(report))
    run.shift_suite = _shift_suite(report)
    return run


def _seconds_between(started: Any, finished: Any) -> float | None:
    try:
        elapsed = datetime.datetime.fromisoformat(finished) - datetime.datetime.fromisoformat(
            started
        )
    except (TypeError, ValueError):
        return None
    return elapsed.total_seconds() if elapsed.total_seconds() >= 0 else None


def _integer(value: Any) -> int | None:
    number = _number(value)
    return int(number) if number is not None and number == int(number) else None


def _validation_values(metrics: dict[str, Any], prefix: str) -> dict[str, float]:
    values = {}
    for name, value in metrics.items():
        number = _number(value)
        if number is not None:
            values[f"{prefix}/{str(name).removeprefix('val/')}"] = number
    return values


def _validation_from_csv(
    path: Path, metric: str | None, mode: str | None
) -> tuple[dict[str, float], dict[str, float], int] | None:
    """``(best epoch's val/* values, last epoch's, epochs)`` from Lightning's ``metrics.csv``.

    The best epoch is the one best by the run's optimized metric if that is a validation metric,
    else by validation balanced accuracy (what the checkpoints are chosen by).
    """
    if not path.is_file():
        return None
    by_epoch: dict[int, dict[str, float]] = {}
    try:
        with path.open(newline="") as handle:
            for row in csv.DictReader(handle):
                values = {
                    key: number
                    for key, text in row.items()
                    if isinstance(key, str)
                    and key.startswith("val/")
                    and (number := _number(text)) is not None
                }
                if not values:
                    continue
                epoch = _integer(row.get("epoch"))
                epoch = epoch if epoch is not None else len(by_epoch)
                # Lightning may split one epoch's values over rows; they are one epoch.
                by_epoch.setdefault(epoch, {}).update(values)
    except (OSError, UnicodeDecodeError, csv.Error):
        return None
    if not by_epoch:
        return None
    if metric is not None and metric.startswith("val/"):
        key, key_mode = metric, mode or metric_mode(metric)
    else:
        key, key_mode = DEFAULT_METRIC, "max"
    sign = 1.0 if key_mode == "max" else -1.0
    ranked = [(sign * values[key], -epoch) for epoch, values in by_epoch.items() if key in values]
    last_epoch = max(by_epoch)
    best_epoch = -max(ranked)[1] if ranked else last_epoch
    return by_epoch[best_epoch], by_epoch[last_epoch], last_epoch + 1


def _test_values(report: dict[str, Any] | None) -> dict[str, float]:
    """``test/*``, ``external/<set>/*`` and ``shift/robustness`` of ``test_metrics.json``."""
    if report is None:
        return {}
    values: dict[str, float] = {}

    def add(prefix: str, metrics: Any) -> None:
        if isinstance(metrics, dict):
            for name, value in metrics.items():
                if (number := _number(value)) is not None:
                    values[f"{prefix}/{name}"] = number

    add("test", report.get("metrics"))
    external = report.get("external")
    if isinstance(external, dict):
        for name, result in external.items():
            if isinstance(result, dict):
                add(f"external/{name}", result.get("metrics"))
                add(f"external/{name}", {"ece": result.get("ece")})
    shift = report.get("shift_suite")
    if isinstance(shift, dict) and (score := _number(shift.get("score"))) is not None:
        values["shift/robustness"] = score
    return values


def _shift_suite(report: dict[str, Any] | None) -> str | None:
    """The perturbed sets of a run's shift suite, in words: ``"blur, contrast at severities 1,
    2, 3"`` (``"..., 3 of 27 sets differ"`` for a suite that is no full grid)."""
    shift = report.get("shift_suite") if isinstance(report, dict) else None
    rows = shift.get("rows") if isinstance(shift, dict) else None
    if not isinstance(rows, list) or not rows:
        return None
    try:
        sets = {(str(row["perturbation"]), int(row["severity"])) for row in rows}
    except (KeyError, TypeError, ValueError):
        return None
    names = sorted({name for name, _ in sets})
    severities = sorted({severity for _, severity in sets})
    text = f"{', '.join(names)} at severities {', '.join(map(str, severities))}"
    missing = len(names) * len(severities) - len(sets)
    return text if not missing else f"{text} ({len(sets)} of {len(names) * len(severities)} sets)"
