"""The ranking metric against each swept value: ``summary_<key>.png`` beside the sweep's table.

A table ranks runs; a figure shows the trend a sweep was run to find (balanced accuracy against the
learning rate, one line per optimizer). One figure per swept override key; runs that differ only in
``seed`` are one point, their mean, with the standard deviation as an error bar. Only finished runs
with a score are drawn.

matplotlib is imported when a figure is drawn, not with this module: the sweep callback is
unpickled into every launcher process.
"""

from __future__ import annotations

import re
import statistics
from pathlib import Path
from typing import TYPE_CHECKING

from pneumonia.files import save_figure
from pneumonia.sweeps.summary import FINISHED, SEED_KEY, Summary

if TYPE_CHECKING:
    from matplotlib.figure import Figure

MARKERS = "osD^v<>pXh*"
# A numeric key whose values span more than this factor is drawn on a log axis.
LOG_SPAN = 10.0


def plotted_keys(summary: Summary) -> list[str]:
    """The swept keys worth a figure: every one that differs between runs, except ``seed``."""
    return [key for key in summary.swept_keys if key != SEED_KEY]


def _numbers(values: list[str]) -> list[float] | None:
    try:
        return [float(value) for value in values]
    except ValueError:
        return None


def _order(values: tuple[str, ...]) -> list[tuple[int, float, str]]:
    # Numbers by value (0.003 before 0.01), then words alphabetically.
    key = []
    for value in values:
        number = _numbers([value])
        key.append((0, number[0], "") if number else (1, 0.0, value))
    return key


def uses_log_axis(values: list[float]) -> bool:
    """Positive values spanning more than a factor of :data:`LOG_SPAN` (a learning rate)."""
    return bool(values) and min(values) > 0 and max(values) / min(values) > LOG_SPAN


def swept_value_figure(summary: Summary, key: str) -> Figure | None:
    """The score against ``key``'s values, one line per combination of the other swept keys.

    Returns None when fewer than two of ``key``'s values have a finished, scored run.
    """
    from matplotlib.figure import Figure

    runs = [
        run
        for run in summary.runs
        if run.status in FINISHED and summary.score(run) is not None and key in run.overrides
    ]
    values = list(dict.fromkeys(run.overrides[key] for run in runs))
    if len(values) < 2:
        return None
    numeric = _numbers(values)
    if numeric is not None:
        order = sorted(range(len(values)), key=lambda i: numeric[i])
        position = {values[i]: numeric[i] for i in order}
    else:
        order = sorted(range(len(values)), key=lambda i: values[i])
        position = {values[i]: float(n) for n, i in enumerate(order)}
    others = [other for other in plotted_keys(summary) if other != key]

    lines: dict[tuple[str, ...], dict[str, list[float]]] = {}
    for run in runs:
        line = tuple(run.overrides.get(other, "default") for other in others)
        lines.setdefault(line, {}).setdefault(run.overrides[key], []).append(summary.score(run))

    fig = Figure(figsize=(7.0, 4.2), dpi=100)
    ax = fig.subplots()
    for i, (line, points) in enumerate(sorted(lines.items(), key=lambda item: _order(item[0]))):
        xs = sorted(points, key=lambda value: position[value])
        means = [statistics.fmean(points[x]) for x in xs]
        stds = [statistics.stdev(points[x]) if len(points[x]) > 1 else 0.0 for x in xs]
        label = ", ".join(f"{other}={value}" for other, value in zip(others, line, strict=True))
        ax.errorbar(
            [position[x] for x in xs],
            means,
            yerr=stds if any(stds) else None,
            marker=MARKERS[i % len(MARKERS)],
            # A line joins numeric values only: between categories it would suggest a trend.
            linestyle="-" if numeric is not None else "none",
            capsize=3,
            label=label or None,
        )
    if numeric is not None:
        if uses_log_axis(list(position.values())):
            ax.set_xscale("log")
    else:
        ax.set_xticks([position[values[i]] for i in order], labels=[values[i] for i in order])
    seeds = any(len(group) > 1 for points in lines.values() for group in points.values())
    ax.set_xlabel(key)
    ax.set_ylabel(summary.metric)
    ax.set_title(
        f"{summary.metric} ({summary.mode}) against {key}"
        + ("\nmean ± standard deviation over seeds" if seeds else "")
    )
    ax.grid(alpha=0.3)
    if others:
        # Outside the axes; savefig's bbox_inches="tight" widens the image to hold it.
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize="small")
    else:
        fig.tight_layout()
    return fig


def figure_path(output_dir: Path, key: str) -> Path:
    """``summary_<key>.png``, the key made safe as a file name."""
    return Path(output_dir) / f"summary_{re.sub(r'[^A-Za-z0-9._-]+', '_', key)}.png"


def write_figures(summary: Summary, output_dir: str | Path) -> list[Path]:
    """Write :func:`swept_value_figure` for every :func:`plotted_keys` key; none if nothing was swept."""
    written = []
    for key in plotted_keys(summary):
        fig = swept_value_figure(summary, key)
        if fig is None:
            continue
        written.append(save_figure(fig, figure_path(Path(output_dir), key), bbox_inches="tight"))
    return written
