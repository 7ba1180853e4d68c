"""Hydra callbacks and resolvers that keep a run folder's history whole.

- ``${pneumonia.record_dir:<output_dir>}`` (``hydra.output_subdir``): a run folder that already has a
  Hydra record (a resumed run, a repeated sweep job) gets the new one beside it, in
  ``.hydra/rerun-<time>/``, instead of Hydra overwriting the original overrides.
- :class:`LogFailedJob`: a job that raised writes its traceback into its own task log, which is
  often all a sweep user reads (Hydra prints it only to the terminal).

Importing this module registers the resolver. Hydra unpickles its callbacks in every launcher
process (joblib, submitit), which imports this module there too.
"""

from __future__ import annotations

import datetime
import logging
import traceback
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

RECORD_DIR = ".hydra"
log = logging.getLogger("pneumonia")


def record_dir(output_dir: str) -> str:
    """``.hydra``, or ``.hydra/rerun-<time>`` when ``output_dir`` already holds a Hydra record."""
    if not (Path(output_dir) / RECORD_DIR / "config.yaml").exists():
        return RECORD_DIR
    stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S-%f")
    return f"{RECORD_DIR}/rerun-{stamp}"


def register_resolvers() -> None:
    """Register ``pneumonia.record_dir`` once."""
    if not OmegaConf.has_resolver("pneumonia.record_dir"):
        # Cached: Hydra reads hydra.output_subdir twice and must get one folder both times.
        OmegaConf.register_new_resolver("pneumonia.record_dir", record_dir, use_cache=True)


register_resolvers()


class LogFailedJob(Callback):
    """Write a failed job's exception and traceback into the job's task log."""

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        if job_return.status != JobStatus.FAILED:
            return
        try:
            job_return.return_value  # noqa: B018 - re-raises the job's exception when it failed
            return
        except BaseException as raised:
            error = raised
        frames = error.__traceback__
        # Skip the frames of the re-raise above: the traceback starts where the job failed.
        while frames is not None and frames.tb_frame.f_code.co_name in (
            "on_job_end",
            "return_value",
        ):
            frames = frames.tb_next
        text = "".join(traceback.format_exception(type(error), error, frames))
        record = log.makeRecord(
            log.name, logging.ERROR, __file__, 0, "run failed:\n%s", (text.rstrip(),), None
        )
        # Only the file handlers: Hydra itself prints the traceback on the terminal.
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.FileHandler):
                handler.handle(record)
