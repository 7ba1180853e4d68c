"""One table of every run below a folder: what each changed, how it scored, whether it finished.

A sweep's job folders (or the single runs under ``outputs/runs``) each record their own result;
comparing them meant opening TensorBoard or a dozen JSON files. :func:`summarize` finds every run
folder below a folder, reads what it recorded, ranks the runs by one metric and writes, into that
folder (each file written aside, then renamed, so a reader never sees half a table):

- ``summary.csv``: a row per run: status and error, one column per override key, the score, the
  validation metrics of the best epoch (``val_best/*``), the test metrics (``test/*``), the external
  test sets (``external/<set>/*``) and the shift suite's ``shift/robustness`` where present, epochs,
  wall time and the folder;
- ``summary_by_seed.csv``: runs whose overrides differ only in ``seed``, averaged (mean, standard
  deviation and count per metric), when there are any;
- ``summary.md``: both tables for people, and the figures of :mod:`pneumonia.sweeps.figures`.

What each run recorded is read by :mod:`pneumonia.sweeps.runs`.

Only the standard library and PyYAML are imported here: the Hydra callback runs this in the
process that launched a sweep, and the CLI should answer in a second.
"""

from __future__ import annotations

import csv
import io
import logging
import statistics
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pneumonia.files import write_atomic
from pneumonia.sweeps.runs import (
    DEFAULT_METRIC,
    HYDRA_DIR,
    MODES,
    UNKNOWN,
    Run,
    find_run_folders,
    natural_key,
    read_run,
)
from pneumonia.training.status import COMPLETED, FAILED, STATUS_FILE, metric_mode

log = logging.getLogger(__name__)

SUMMARY_CSV = "summary.csv"
SUMMARY_MD = "summary.md"
SEED_CSV = "summary_by_seed.csv"

# Overrides that differ between invocations of one search without making its runs differ.
_NOT_SWEPT = frozenset({"optuna_trials", "hparams_search"})
# Ranked first to last; a status not named here (e.g. "interrupted") goes between.
_STATUS_ORDER = {COMPLETED: 0, UNKNOWN: 1, FAILED: 3}
# Runs whose metrics are final: the ones averaged over seeds and plotted. UNKNOWN is a run from
# before run_status.json existed; whatever metrics it left are its final ones.
FINISHED = frozenset({COMPLETED, UNKNOWN})

# The metrics people compare runs by, in reading order: pneumonia.metrics.diagnostic.METRIC_NAMES
# plus the loss (a test checks they agree; importing it here would import torch into the CLI).
READ_METRICS: tuple[str, ...] = (
    "balanced_accuracy",
    "auroc",
    "precision",
    "recall",
    "specificity",
    "f1",
    "accuracy",
    "loss",
)
SEED_KEY = "seed"
_FIXED_COLUMNS = ("rank", "status", "error", "score", "epochs", "wall_time_s", "folder")


class NoRunsError(FileNotFoundError):
    """A folder that does not exist or holds no run folder at any depth."""


class UnknownMetricError(ValueError):
    """A ranking metric that no run has; ``available`` lists the ones they have."""

    def __init__(self, metric: str, available: Sequence[str]) -> None:
        self.metric = metric
        self.available = list(available)
        super().__init__(
            f"no run has the metric {metric!r}; available: {', '.join(self.available) or 'none'} "
            "(val/<name> also means val_best/<name>)"
        )


# --------------------------------------------------------------------------------------------
# The tables


def _shift_suite_note(runs: Sequence[Run]) -> str | None:
    """A note when the runs' ``shift/robustness`` averages over different perturbed sets."""
    suites: dict[str, list[str]] = {}
    for run in runs:
        if run.shift_suite is not None and "shift/robustness" in run.values:
            suites.setdefault(run.shift_suite, []).append(run.folder)
    if len(suites) < 2:
        return None
    described = "; ".join(
        f"{suite} ({', '.join(f'`{folder}`' for folder in folders[:3])}"
        f"{f' and {len(folders) - 3} more' if len(folders) > 3 else ''})"
        for suite, folders in suites.items()
    )
    return (
        "`shift/robustness` averages over different shift suites in these runs, so its values "
        f"do not compare: {described}. Rerun the shift suite with one set of perturbations and "
        "severities (python train.py --config-name shift ckpt_path=<run>)."
    )


@dataclass
class SeedGroup:
    """Runs whose overrides differ only in ``seed``.

    Attributes:
        overrides: the overrides they share (``seed`` left out).
        seeds: the seeds, as written (``default`` for a run that set none).
        runs: every member, ranked.
        stats: column -> ``(mean, standard deviation or None for one value, count)`` over the
            finished members that have the column.
    """

    overrides: dict[str, str]
    seeds: list[str]
    runs: list[Run]
    stats: dict[str, tuple[float, float | None, int]]

    @property
    def finished(self) -> int:
        """How many members finished (the most any metric's count can be)."""
        return sum(run.status in FINISHED for run in self.runs)


@dataclass
class Summary:
    """Every run below :attr:`folder`, ranked by :attr:`metric`; see :func:`build_summary`.

    Attributes:
        columns: the metric columns shown (besides ``score``), in reading order.
        override_keys: every override key, in order of first appearance.
        swept_keys: the override keys whose value differs between runs.
        notes: sentences for the reader (e.g. runs that optimised another metric).
        figures: the figure files written beside the table.
    """

    folder: Path
    metric: str
    mode: str
    runs: list[Run]
    columns: list[str]
    override_keys: list[str]
    swept_keys: list[str]
    seed_groups: list[SeedGroup]
    notes: list[str] = field(default_factory=list)
    figures: list[Path] = field(default_factory=list)

    def score(self, run: Run) -> float | None:
        """``run``'s value of the ranking metric."""
        return run.value(self.metric)

    @property
    def common_overrides(self) -> dict[str, str]:
        """The overrides every run has, with the same value."""
        first = self.runs[0].overrides if self.runs else {}
        return {
            key: first[key]
            for key in self.override_keys
            if key not in self.swept_keys and key in first
        }

    def _override_columns(self, keys: Iterable[str]) -> dict[str, str]:
        # An override named like a fixed column ("score") would overwrite it.
        return {key: f"override/{key}" if key in _FIXED_COLUMNS else key for key in keys}

    def table(self) -> list[dict[str, Any]]:
        """The rows of ``summary.csv``, ranked: column -> value (None where absent)."""
        columns = self._override_columns(self.override_keys)
        rows = []
        for rank, run in enumerate(self.runs, start=1):
            row: dict[str, Any] = {"rank": rank, "status": run.status, "error": run.error}
            row.update({columns[key]: run.overrides.get(key) for key in self.override_keys})
            row["score"] = self.score(run)
            row.update({column: run.values.get(column) for column in self.columns})
            row.update(epochs=run.epochs, wall_time_s=run.wall_time_s, folder=run.folder)
            rows.append(row)
        return rows

    def seed_table(self) -> list[dict[str, Any]]:
        """The rows of ``summary_by_seed.csv``: ``<column> mean``, ``std`` and ``n`` per metric."""
        keys = [key for key in self.override_keys if key != SEED_KEY]
        columns = self._override_columns(keys)
        rows = []
        for group in self.seed_groups:
            row: dict[str, Any] = {columns[key]: group.overrides.get(key) for key in keys}
            row.update(seeds=" ".join(group.seeds), runs=len(group.runs), finished=group.finished)
            for column in ("score", *self.columns):
                mean, std, count = group.stats.get(column, (None, None, 0))
                row.update({f"{column} mean": mean, f"{column} std": std, f"{column} n": count})
            rows.append(row)
        return rows

    def to_markdown(self) -> str:
        """``summary.md``: the ranked table, the means over seeds and the figures."""
        counts = Counter(run.status for run in self.runs)
        tally = ", ".join(f"{count} {status}" for status, count in counts.most_common())
        lines = [
            f"# Runs in `{self.folder}`",
            "",
            f"{len(self.runs)} run{'s' if len(self.runs) != 1 else ''} ({tally}), ranked by "
            f"**{self.metric}** ({self.mode}); "
            "failed and unfinished runs last. `score` is each run's "
            f"{self.metric}; `val_best/*` are the validation metrics of its best epoch, `test/*` "
            "those of its best checkpoint on the test split.",
        ]
        lines += ["", *self.notes] if self.notes else []
        common = self.common_overrides
        if common:
            same = ", ".join(f"`{key}={value}`" for key, value in common.items())
            lines += ["", f"Same in every run: {same}."]
        if any(key not in run.overrides for key in self.swept_keys for run in self.runs):
            lines += ["", "An empty override cell: the run kept the config's value."]
        lines += ["", *self._markdown_runs()]
        if self.seed_groups:
            lines += [
                "",
                "## Mean over seeds",
                "",
                "Runs whose overrides differ only in `seed`: mean ± standard deviation over the "
                "finished runs (`n`; a metric some of them lack shows its own count). Every "
                f"value is in `{SEED_CSV}`.",
                "",
                *self._markdown_seeds(),
            ]
        if self.figures:
            lines += ["", "## Figures", ""]
            lines += [
                f"![{self.metric} against {path.stem.removeprefix('summary_')}]({path.name})"
                for path in self.figures
            ]
        return "\n".join(lines) + "\n"

    def _markdown_runs(self) -> list[str]:
        keys = self.swept_keys
        header = ["#", "status", *keys, "score", *self.columns, "epochs", "wall time", "folder"]
        align = ["--:", ":--", *[":--"] * len(keys), *["--:"] * (len(self.columns) + 3), ":--"]
        rows = []
        for rank, run in enumerate(self.runs, start=1):
            status = run.status if not run.error else f"{run.status}: {_shorten(run.error)}"
            rows.append(
                [
                    str(rank),
                    status,
                    *(run.overrides.get(key, "") for key in keys),
                    _format(self.score(run)),
                    *(_format(run.values.get(column)) for column in self.columns),
                    _format(run.epochs),
                    _format_duration(run.wall_time_s),
                    run.folder,
                ]
            )
        return _markdown_table(header, align, rows)

    def _markdown_seeds(self) -> list[str]:
        groups = self.seed_groups
        # Only what tells the groups apart, and only the metrics some group has.
        keys = [
            key
            for key in self.swept_keys
            if key != SEED_KEY and any(key in group.overrides for group in groups)
        ]
        columns = [c for c in self.columns if any(c in group.stats for group in groups)]
        header = [*keys, "seeds", "runs", "n", "score", *columns]
        align = [*[":--"] * (len(keys) + 1), *["--:"] * (len(columns) + 3)]
        rows = []
        for group in groups:
            cells = [
                _format_stats(group.stats.get(column), group.finished)
                for column in ("score", *columns)
            ]
            rows.append(
                [
                    *(group.overrides.get(key, "") for key in keys),
                    " ".join(group.seeds),
                    str(len(group.runs)),
                    str(group.finished),
                    *cells,
                ]
            )
        return _markdown_table(header, align, rows)


def _format(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, int):
        return str(value)
    return f"{value:.4f}"


def _format_stats(stats: tuple[float, float | None, int] | None, finished: int) -> str:
    if stats is None:
        return "–"
    mean, std, count = stats
    text = _format(mean) if std is None else f"{_format(mean)} ± {_format(std)}"
    return text if count == finished else f"{text} (n={count})"


def _format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


def _shorten(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _cell(text: str) -> str:
    return str(text).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def _markdown_table(header: list[str], align: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(_cell(cell) for cell in row) + " |" for row in rows]
    return lines


def build_summary(
    runs: Sequence[Run],
    folder: str | Path,
    metric: str | None = None,
    mode: str | None = None,
) -> Summary:
    """Rank ``runs`` and group their seeds.

    Args:
        runs: from :func:`read_run`.
        folder: the folder they were found in (for the title).
        metric: the ranking metric; by default the one most runs optimised (``val/<m>`` means
            the best epoch's ``val_best/<m>``).
        mode: ``max`` or ``min``; by default as the runs recorded it, else ``min`` for a loss or a
            calibration error and ``max`` otherwise.

    Raises:
        UnknownMetricError: ``metric`` was given and no run has it.
        ValueError: ``mode`` is neither ``max`` nor ``min``.
    """
    notes = []
    optimized = Counter(run.optimized_metric for run in runs if run.optimized_metric)
    if metric is None:
        metric = optimized.most_common(1)[0][0] if optimized else DEFAULT_METRIC
        if len(optimized) > 1:
            others = ", ".join(f"`{name}` ({n})" for name, n in optimized.items() if name != metric)
            notes.append(
                f"Runs optimised different metrics: {others} besides `{metric}`; ranked by "
                f"`{metric}` (choose another with `--metric`)."
            )
    elif not any(run.value(metric) is not None for run in runs):
        raise UnknownMetricError(metric, sorted(set().union(*(run.values for run in runs))))
    if mode is None:
        recorded = Counter(run.mode for run in runs if run.optimized_metric == metric and run.mode)
        mode = recorded.most_common(1)[0][0] if recorded else metric_mode(metric)
    if mode not in MODES:
        raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")

    if (shift_note := _shift_suite_note(runs)) is not None:
        notes.append(shift_note)
    sign = -1.0 if mode == "max" else 1.0

    def rank(run: Run) -> tuple:
        score = run.value(metric)
        # A Hydra record and nothing else is a job stopped before it began, not an older run.
        unfinished = run.status == UNKNOWN and not run.values
        return (
            2 if unfinished else _STATUS_ORDER.get(run.status, 2),
            score is None,
            sign * score if score is not None else 0.0,
            natural_key(run.folder),
        )

    ranked = sorted(runs, key=rank)
    override_keys = list(dict.fromkeys(key for run in ranked for key in run.overrides))
    swept_keys = [
        key
        for key in override_keys
        if key not in _NOT_SWEPT and len({run.overrides.get(key) for run in ranked}) > 1
    ]
    summary = Summary(
        folder=Path(folder),
        metric=metric,
        mode=mode,
        runs=ranked,
        columns=_metric_columns(ranked),
        override_keys=override_keys,
        swept_keys=swept_keys,
        seed_groups=[],
        notes=notes,
    )
    summary.seed_groups = _seed_groups(summary)
    return summary


def _metric_columns(runs: Sequence[Run]) -> list[str]:
    """The columns people read, where at least one run has them (not every logged scalar)."""
    present = set().union(*(run.values for run in runs)) if runs else set()
    prefixes = ["val_best", "test"]
    external = {key.split("/")[1] for key in present if key.startswith("external/")}
    prefixes += [f"external/{name}" for name in sorted(external)]
    columns = [
        f"{prefix}/{name}"
        for prefix in prefixes
        for name in READ_METRICS
        if f"{prefix}/{name}" in present
    ]
    return columns + (["shift/robustness"] if "shift/robustness" in present else [])


def _seed_groups(summary: Summary) -> list[SeedGroup]:
    members: dict[tuple[tuple[str, str], ...], list[Run]] = {}
    for run in summary.runs:
        key = tuple(sorted((k, v) for k, v in run.overrides.items() if k != SEED_KEY))
        members.setdefault(key, []).append(run)
    groups = []
    for key, runs in members.items():
        seeds = [run.overrides.get(SEED_KEY, "default") for run in runs]
        # Repeats of one seed are reruns of one configuration, not a spread over seeds.
        if len(set(seeds)) < 2:
            continue
        finished = [run for run in runs if run.status in FINISHED]
        stats = {}
        for column in ("score", *summary.columns):
            values = [
                value
                for run in finished
                if (value := summary.score(run) if column == "score" else run.values.get(column))
                is not None
            ]
            if values:
                std = statistics.stdev(values) if len(values) > 1 else None
                stats[column] = (statistics.fmean(values), std, len(values))
        groups.append(
            SeedGroup(
                overrides=dict(key),
                seeds=sorted(set(seeds), key=natural_key),
                runs=runs,
                stats=stats,
            )
        )
    sign = -1.0 if summary.mode == "max" else 1.0

    def rank(group: SeedGroup) -> tuple[bool, float]:
        mean = group.stats["score"][0] if "score" in group.stats else None
        return (mean is None, sign * mean if mean is not None else 0.0)

    return sorted(groups, key=rank)


# --------------------------------------------------------------------------------------------
# Writing


def _csv_text(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    columns = list(dict.fromkeys(key for row in rows for key in row))
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: "" if value is None else value for key, value in row.items()})
    return buffer.getvalue()


def write_summary(summary: Summary, output_dir: str | Path, plots: bool = True) -> list[Path]:
    """Write ``summary.csv``, ``summary.md``, ``summary_by_seed.csv`` (when seeds were grouped) and
    the figures into ``output_dir``; return the paths written.

    Files an earlier summary left that this one would not write (a seed table, a figure of a key no
    longer swept) are removed: beside a new table they would contradict it.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    written = []
    if plots:
        from pneumonia.sweeps.figures import write_figures

        summary.figures = write_figures(summary, output_dir)
        written += summary.figures
    for stale in output_dir.glob("summary_*.png"):
        if stale not in summary.figures:
            stale.unlink(missing_ok=True)
    written.append(write_atomic(output_dir / SUMMARY_CSV, _csv_text(summary.table())))
    seed_csv = output_dir / SEED_CSV
    if summary.seed_groups:
        written.append(write_atomic(seed_csv, _csv_text(summary.seed_table())))
    else:
        seed_csv.unlink(missing_ok=True)
    written.append(write_atomic(output_dir / SUMMARY_MD, summary.to_markdown()))
    return written


def summarize(
    folder: str | Path,
    metric: str | None = None,
    mode: str | None = None,
    output: str | Path | None = None,
    plots: bool = True,
) -> Summary:
    """Summarise every run below ``folder`` and write the tables and figures.

    Args:
        folder: a sweep's folder, ``outputs/runs``, a single run, or any folder holding runs.
        metric, mode: the ranking, see :func:`build_summary`.
        output: where to write (default: ``folder``).
        plots: write the figures (``summary_<key>.png``) too.

    Returns:
        The summary; ``summary.to_markdown()`` is what ``summary.md`` holds.

    Raises:
        NoRunsError: ``folder`` does not exist or holds no run folder.
        UnknownMetricError: ``metric`` was given and no run has it.
    """
    root = Path(folder)
    if not root.exists():
        raise NoRunsError(
            f"{root} does not exist: give the folder of a sweep (outputs/multiruns/<date>_<time>), "
            "of single runs (outputs/runs) or of one run"
        )
    if not root.is_dir():
        raise NoRunsError(f"{root} is a file, not a folder: give the folder that holds the runs")
    folders = find_run_folders(root)
    if not folders:
        raise NoRunsError(
            f"{root} holds no run folder (a folder with {STATUS_FILE} or {HYDRA_DIR}/config.yaml, "
            "at any depth): give the folder of a sweep (outputs/multiruns/<date>_<time>), of "
            "single runs (outputs/runs) or of one run"
        )
    summary = build_summary([read_run(path, root) for path in folders], root, metric, mode)
    write_summary(summary, root if output is None else output, plots=plots)
    return summary
