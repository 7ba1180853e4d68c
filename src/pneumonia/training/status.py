"""``run_status.json``: whether a run finished, failed or is still running, and what it scored.

Every run folder gets one as soon as the run starts (``running``), rewritten when it ends
(``completed``, ``failed`` with the first line of its error, or ``interrupted``). Sweep summaries
(:mod:`pneumonia.sweeps.summary`) rank runs by it, and a rerun of a sweep skips the jobs it marks
``completed``. A run killed outright stays ``running``; its lock (below) tells it from a live one.

Fields: ``status``, ``error``, ``overrides`` (the run's Hydra task overrides),
``optimized_metric``, ``mode`` (``max``/``min``), ``score``, ``started``, ``finished``,
``wall_time_s``, ``attempts``, ``epochs``, ``global_step``, ``best_epoch``, ``best_val`` and
``last_val`` (validation metrics of the epoch of the tested weights and of the last epoch).

``wall_time_s`` is rewritten at every update, so a killed run leaves the time it had spent up to its
last epoch; a run resumed in its own folder adds its time to that, keeps the first ``started`` and
counts ``attempts``.

A live run also holds the folder's lock (:func:`hold_run_folder`, an ``flock`` on ``.run.lock`` that
the kernel releases when the process dies, however it dies). A second process is refused the
folder while the first holds it: after a sweep killed with SIGKILL, joblib's workers live on and
finish their jobs, and the rerun would otherwise train the same folder at the same time. The lock
also tells a ``running`` status of a live run (:func:`run_is_live`) from one a kill left behind.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pneumonia.errors import RunFolderBusyError, refused_construction
from pneumonia.files import remove_stale_side_files, write_atomic
from pneumonia.locks import close_lock_file, exclusive_lock, open_lock_file, try_lock

log = logging.getLogger(__name__)

STATUS_FILE = "run_status.json"
LOCK_FILE = ".run.lock"
RUNNING, COMPLETED, FAILED, INTERRUPTED = "running", "completed", "failed", "interrupted"


def metric_mode(metric: str) -> str:
    """``min`` for a loss or a calibration error, ``max`` for every other metric."""
    name = metric.rsplit("/", 1)[-1]
    return "min" if name in ("loss", "ece", "ece_uncalibrated") else "max"


def error_line(error: BaseException) -> str:
    """``<type>: <first line of the message>``, what a table of runs has room for."""
    if isinstance(error, KeyboardInterrupt | SystemExit):
        # Lightning turns Ctrl-C into SystemExit(1) after its graceful shutdown.
        return f"stopped by Ctrl-C or a signal ({type(error).__name__})"
    refused = refused_construction(error)  # Hydra's first line names only the target
    if refused is not None:
        return refused.splitlines()[0]
    message = str(error).strip().splitlines()
    return f"{type(error).__name__}: {message[0]}" if message else type(error).__name__


def read_status(folder: str | Path) -> dict[str, Any] | None:
    """The run's status record, or None when it has none (or an unreadable one)."""
    try:
        record = json.loads((Path(folder) / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


class RunStatus:
    """The status record of one run, written atomically at each change."""

    def __init__(
        self,
        output_dir: str | Path,
        overrides: list[str],
        optimized_metric: str,
        continues: bool = False,
    ) -> None:
        """``continues``: the run resumes in ``output_dir``; its earlier attempts' time counts."""
        self.path = Path(output_dir) / STATUS_FILE
        self._clock = time.monotonic()
        earlier = (read_status(output_dir) or {}) if continues else {}
        #: The record of the attempts before this one ({} for a new run), for :meth:`restore`.
        self.earlier: dict[str, Any] = earlier
        spent = earlier.get("wall_time_s")
        self._earlier_seconds = float(spent) if isinstance(spent, int | float) else 0.0
        attempts = earlier.get("attempts")
        earlier_attempts = attempts if isinstance(attempts, int) else 1
        self.record: dict[str, Any] = {
            "status": RUNNING,
            "error": None,
            "overrides": list(overrides),
            "optimized_metric": optimized_metric,
            "mode": metric_mode(optimized_metric),
            "score": None,
            "started": earlier.get("started") or _now(),
            "finished": None,
            "wall_time_s": None,
            "attempts": earlier_attempts + 1 if earlier else 1,
            "epochs": None,
            "global_step": None,
            "best_epoch": None,
            "best_val": {},
            "last_val": {},
        }
        self._write()

    def update(self, **fields: Any) -> None:
        """Record progress (epochs, validation metrics) without ending the run."""
        self.record.update({k: _plain(v) for k, v in fields.items()})
        self.record["wall_time_s"] = self._wall_time()
        self._write()

    def end(
        self, status: str, score: float | None = None, error: BaseException | None = None
    ) -> None:
        """Mark the run ``completed``, ``failed`` or ``interrupted``, with its wall time."""
        self.record.update(
            status=status,
            score=_plain(score),
            error=error_line(error) if error is not None else None,
            finished=_now(),
            wall_time_s=self._wall_time(),
        )
        self._write()

    def restore(self) -> None:
        """Write back the record of the attempts before this one (this one never started)."""
        self.record = dict(self.earlier)
        self._write()

    def _wall_time(self) -> float:
        return round(self._earlier_seconds + time.monotonic() - self._clock, 2)

    def _write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path, json.dumps(self.record, indent=2, allow_nan=False) + "\n")


def _now() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")


def _plain(value: Any) -> Any:
    """JSON-safe: tensors and numpy numbers to floats, NaN and infinity to None."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, bool | int | str):
        return value
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    return number if math.isfinite(number) else None


@contextmanager
def hold_run_folder(folder: Path) -> Iterator[None]:
    """Hold ``folder``'s lock while a run works in it (see :mod:`pneumonia.locks`), and clear the
    unfinished files that processes killed in it left (``files.remove_stale_side_files``).

    Raises:
        RunFolderBusyError: another live process holds it; the message names its process id.
    """

    def refuse(descriptor: int) -> None:
        holder = os.pread(descriptor, 32, 0).decode(errors="replace").strip() or "?"
        raise RunFolderBusyError(
            f"another process (pid {holder}) is running in {folder}; wait for it to end or "
            f"stop it (kill {holder}). A sweep killed outright leaves its joblib workers "
            "running their jobs: rerun it once they are done"
        )

    # A few tries: run_is_live() holds the lock shared for an instant while it looks.
    with exclusive_lock(
        Path(folder) / LOCK_FILE,
        "concurrent runs in it are not refused",
        when_held=refuse,
        tries=10,
    ) as held:
        if held.descriptor is not None:
            os.ftruncate(held.descriptor, 0)
            os.pwrite(held.descriptor, f"{os.getpid()}\n".encode(), 0)
            # No other run writes here now: hidden side files are what killed writers left.
            # (Unlocked, another machine's live writer could own one: its pid means nothing here.)
            remove_stale_side_files(folder)
        yield


def run_is_live(folder: Path) -> bool | None:
    """Whether a process holds ``folder``'s lock now; None for a folder without one (older runs)
    or where locks cannot be taken."""
    path = Path(folder) / LOCK_FILE
    try:
        # Non-blocking: a FIFO planted under the lock's name must not hang a summary.
        descriptor = open_lock_file(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            return None
        return not try_lock(descriptor, shared=True)
    except OSError:
        return None
    finally:
        close_lock_file(descriptor)
