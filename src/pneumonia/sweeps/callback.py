"""The Hydra callback that writes a sweep's summary (:mod:`pneumonia.sweeps.summary`) into its folder.

Hydra calls ``on_multirun_end`` only when every job succeeded: its sweeper re-raises a failed
job's error before that. So the summary is also rewritten after each job (``on_job_end``, in the
job's process), which leaves a complete one after the last job whatever happened, and a table
that shows a long sweep's progress.

A summary is a report on finished work: whatever goes wrong in it is logged as a warning and never
raised, so it cannot turn a finished sweep into an error. Hydra pickles its callbacks into launcher
processes, so this holds plain settings and imports the summary (and matplotlib) only when called.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("pneumonia")
SUMMARY_LOCK = ".summary.lock"


def sweep_dir(config: DictConfig) -> Path | None:
    """``hydra.sweep.dir`` as an absolute path (relative to where Hydra was started), or None."""
    folder = OmegaConf.select(config, "hydra.sweep.dir")
    if folder is None:
        return None
    # A job with hydra.job.chdir=true is still inside its own folder when its callbacks run.
    start = OmegaConf.select(config, "hydra.runtime.cwd") or os.getcwd()
    return Path(start, str(folder))


class SummarizeSweep(Callback):
    """Summarise ``hydra.sweep.dir`` after each job and at the end of the multirun.

    Args:
        metric: the ranking metric (default: the one the jobs optimised).
        mode: ``max`` or ``min`` (default: as the jobs recorded it).
        after_each_job: rewrite the summary when each job ends, too.
        plots: write the figures beside the table.
    """

    def __init__(
        self,
        metric: str | None = None,
        mode: str | None = None,
        after_each_job: bool = True,
        plots: bool = True,
    ) -> None:
        self.metric = metric
        self.mode = mode
        self.after_each_job = after_each_job
        self.plots = plots

    def on_job_end(self, config: DictConfig, job_return: Any = None, **kwargs: Any) -> None:
        if not self.after_each_job:
            return
        try:
            folder = sweep_dir(config)
            output = OmegaConf.select(config, "hydra.runtime.output_dir")
            # A single run (hydra.run.dir) is no sweep: nothing to summarise.
            if (
                folder is None
                or output is None
                or not Path(output).resolve().is_relative_to(folder.resolve())
            ):
                return
        except Exception as error:
            log.debug("no sweep folder to summarise: %s: %s", type(error).__name__, error)
            return
        self._summarize(folder, "sweep summary so far")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            folder = sweep_dir(config)
        except Exception as error:
            log.warning("the sweep was not summarised: hydra.sweep.dir: %s", error)
            return
        if folder is None:
            log.warning("the sweep was not summarised: the config has no hydra.sweep.dir")
            return
        self._summarize(folder, "sweep summary")

    def _summarize(self, folder: Path, what: str) -> None:
        try:
            from pneumonia.sweeps.summary import SUMMARY_MD, summarize

            # Jobs of a parallel launcher end at once: one summary at a time, each reading every
            # run's status afresh, so the last one written is never older than another.
            with _summary_lock(folder):
                summary = summarize(folder, metric=self.metric, mode=self.mode, plots=self.plots)
        except Exception as error:
            log.warning(
                "the sweep in %s was not summarised: %s: %s (retry: python -m pneumonia.compare %s)",
                folder,
                type(error).__name__,
                error,
                folder,
            )
            return
        best = summary.runs[0]
        score = summary.score(best)
        log.info(
            "%s: %s (%d runs; first: %s, %s %s)",
            what,
            folder / SUMMARY_MD,
            len(summary.runs),
            best.folder,
            summary.metric,
            "n/a" if score is None else f"{score:.4f}",
        )


@contextmanager
def _summary_lock(folder: Path) -> Iterator[None]:
    from pneumonia.locks import exclusive_lock

    with exclusive_lock(folder / SUMMARY_LOCK, "summaries are not serialised"):
        yield  # a summary takes seconds at most


def summarize_interrupted_job() -> None:
    """Run the sweep's :class:`SummarizeSweep` callbacks for this job, which is ending in SIGTERM or
    Ctrl-C.

    Hydra calls ``on_job_end`` only for jobs that return or raise an ``Exception``; a
    ``SystemExit`` (Lightning's SIGTERM, a SLURM preemption) or ``KeyboardInterrupt`` passes by it,
    and the summary would not show the job until the sweep is rerun.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import instantiate

    try:
        # The job's whole config with its hydra node: what Hydra hands on_job_end.
        config = HydraConfig.instance().cfg
        callbacks = OmegaConf.select(config, "hydra.callbacks") or {}
        wanted = f"{SummarizeSweep.__module__}.{SummarizeSweep.__qualname__}"
        settings = [c for c in callbacks.values() if c.get("_target_") == wanted]
        for callback in (instantiate(c) for c in settings):
            callback.on_job_end(config)
    except Exception as error:  # a report: never in the way of the exit
        log.warning(
            "the sweep was not summarised after this job: %s: %s", type(error).__name__, error
        )
