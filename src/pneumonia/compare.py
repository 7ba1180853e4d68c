"""Compare the runs below a folder: ``python -m pneumonia.compare <folder>``.

Writes ``summary.csv``, ``summary.md`` (and ``summary_by_seed.csv``, ``summary_<key>.png`` when
they apply) into the folder, as the sweep callback does at the end of every multirun, and prints
the Markdown table. See :mod:`pneumonia.sweeps.summary` for what is read and how runs are ranked.

Exit status: 0 written, 2 nothing to compare (no such folder, no run in it, an unknown metric),
1 the summary could not be written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pneumonia.sweeps.summary import NoRunsError, UnknownMetricError, summarize


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pneumonia-compare",
        description="Rank every run below FOLDER (a sweep, outputs/runs, or any folder of runs) "
        "and write summary.csv, summary.md and figures into it.",
    )
    parser.add_argument("folder", type=Path, help="e.g. outputs/multiruns/<date>_<time>")
    parser.add_argument(
        "--metric",
        help="rank by this column instead of the runs' optimized metric, e.g. val/auroc, "
        "test/balanced_accuracy, shift/robustness",
    )
    parser.add_argument("--mode", choices=("max", "min"), help="best is the largest or smallest")
    parser.add_argument("--output", type=Path, help="write here instead of into FOLDER")
    parser.add_argument("--no-plots", action="store_true", help="write the tables only")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
        summary = summarize(
            args.folder,
            metric=args.metric,
            mode=args.mode,
            output=args.output,
            plots=not args.no_plots,
        )
    except (NoRunsError, UnknownMetricError) as error:
        print(f"pneumonia-compare: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"pneumonia-compare: could not write the summary: {error}", file=sys.stderr)
        return 1
    print(summary.to_markdown(), end="")
    output = args.output if args.output is not None else args.folder
    print(f"pneumonia-compare: written to {output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
