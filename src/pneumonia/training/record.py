"""What a run leaves behind about itself: ``run_status.json`` and its TensorBoard HPARAMS session.

:class:`RunRecord` follows a run from its start (a resume of a finished or failed run keeps that
record until it trains) to its end, completed, failed or interrupted, with how far it got: epochs,
global step and the validation metrics of its best and last epochs.
"""

from __future__ import annotations

import logging
import re
import shlex
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from pneumonia.errors import CheckpointError
from pneumonia.hydra_hooks import hydra_choices, job_identity, override_key
from pneumonia.training.callbacks import BestEpochMetrics
from pneumonia.training.checkpoints import LAST, is_inside, read_checkpoint
from pneumonia.training.hparams_session import session_hparams, write_session
from pneumonia.training.status import COMPLETED, RunStatus, error_line

log = logging.getLogger(__name__)


class RunRecord:
    """What a run leaves behind about itself: ``run_status.json`` and its TensorBoard session.

    Only the process of global rank zero writes (``strategy=ddp`` starts this code once per rank).
    """

    def __init__(self, cfg: DictConfig, output_dir: Path, overrides: list[str]) -> None:
        self.cfg = cfg
        self.overrides = overrides
        self.writes = rank_zero_only.rank == 0
        self.fits = bool(cfg.get("fit", True))
        continues = self.fits and _resumes_in_place(cfg, output_dir)
        self.status = (
            RunStatus(output_dir, overrides, _reported_metric(cfg), continues=continues)
            if self.writes
            else None
        )
        if self.status is not None and self.status.earlier:
            _warn_of_other_overrides(output_dir, self.status.earlier.get("overrides"), overrides)
        self.trainer: L.Trainer | None = None
        self.loggers: list[Logger] = []
        self.epochs: BestEpochMetrics | None = None
        self.fitted_epochs: dict[str, Any] | None = None

    def watch(
        self, trainer: L.Trainer, loggers: list[Logger], epochs: BestEpochMetrics | None
    ) -> None:
        self.trainer, self.loggers, self.epochs = trainer, loggers, epochs

    def fit_ended(self) -> None:
        """Keep the epoch record as the fit left it: testing a checkpoint restores its callbacks."""
        if self.epochs is not None:
            self.fitted_epochs = self.epochs.state_dict()

    def best_val(self) -> dict[str, float]:
        """The validation metrics of the epoch whose weights the checkpoint keeps."""
        return dict(self._progress().get("best_val") or {})

    def end(
        self, status: str, score: float | None = None, error: BaseException | None = None
    ) -> None:
        if self.status is None:
            return
        if self.status.earlier and self.trainer is None and status != COMPLETED:
            # A resume of this folder's run that ended before any training (a refusal, a bad
            # setting, Ctrl-C): a mistyped resume must not turn a completed run into a failed one
            # and drop how far it got.
            self.status.restore()
            log.info(
                "%s keeps its record (%s): this resume ended before it trained (%s)",
                self.status.path,
                self.status.earlier.get("status"),
                error_line(error) if error is not None else status,
            )
            return
        try:
            self.status.update(**self._progress())
            self.status.end(status, score=score, error=error)
        except Exception as problem:  # the run's own outcome matters more than its record
            log.warning("could not record the run's status: %s", problem)
            if error is None:
                raise
        try:  # a missing HPARAMS row is worth a warning, not a failed run: the status says how it ended
            if self.fits:
                hparams = session_hparams(self.cfg, hydra_choices(), self.overrides, status)
            else:  # the model's settings are the checkpoint's, not this config's defaults
                hparams = {
                    "task": str(self.cfg.get("task_name")),
                    "ckpt_path": str(self.cfg.get("ckpt_path")),
                    "status": status,
                }
            for logger in self.loggers:
                if isinstance(logger, TensorBoardLogger):
                    write_session(logger.log_dir, hparams, status)
        except Exception as problem:
            log.warning("could not write the run's TensorBoard HPARAMS session: %s", problem)

    def _progress(self) -> dict[str, Any]:
        if self.trainer is None:
            return {}
        epochs = self.epochs
        state = self.fitted_epochs or (epochs.state_dict() if epochs is not None else {})
        if epochs is not None and not state.get("epochs"):
            # ddp_spawn trains in workers: their record is in the last checkpoint.
            state = _recorded_epoch_metrics(self.trainer) or state
        return {
            "epochs": state.get("epochs") or self.trainer.current_epoch,
            "global_step": self.trainer.global_step,
            "best_epoch": state.get("best_epoch"),
            "best_val": state.get("best", {}),
            "last_val": state.get("last", {}),
        }


def _warn_of_other_overrides(output_dir: Path, last_attempt: Any, overrides: list[str]) -> None:
    """Say so when a resume in place runs with other overrides than the run's last attempt.

    Continuing with other settings can be meant (more epochs); forgetting the first command's
    overrides is the usual slip, and it silently changes what the rest of the run trains.
    """
    if not isinstance(last_attempt, list):
        return
    last_attempt = [str(o) for o in last_attempt]
    before, now = set(job_identity(last_attempt)), set(job_identity(overrides))
    if before == now:
        return
    log.warning(
        "resuming %s with other overrides than its last attempt (dropped: %s; added: %s). "
        "The rest of the run trains with this command's settings; to continue as it ran, "
        "resume with: %s",
        output_dir,
        " ".join(sorted(before - now)) or "none",
        " ".join(sorted(now - before)) or "none",
        resume_command(last_attempt, output_dir),
    )


def resume_command(overrides: list[str], output_dir: Path) -> str:
    """``python train.py <overrides, in their order> run_dir=<output_dir> ckpt_path=last``, quoted
    for the shell, with ``run_dir`` quoted for Hydra where the path holds ``=``, ``,`` or brackets."""
    kept = [o for o in overrides if override_key(o) not in ("run_dir", "ckpt_path")]
    folder = str(output_dir)
    if not re.fullmatch(r"[\w./:~+@%-]+", folder):
        folder = '"' + folder.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return shlex.join(["python", "train.py", *kept, f"run_dir={folder}", "ckpt_path=last"])


def _resumes_in_place(cfg: DictConfig, output_dir: Path) -> bool:
    """Whether ``ckpt_path`` continues this run folder's own training (``last`` or a file in it)."""
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path is None or str(ckpt_path) == "":
        return False
    if str(ckpt_path) == LAST:
        return True
    path = Path(str(ckpt_path)).expanduser()
    return path.resolve() == output_dir.resolve() or is_inside(path, output_dir)


def _reported_metric(cfg: DictConfig) -> str:
    """What the run's score is: ``optimized_metric``, or for an evaluation what it measured."""
    metric = str(cfg.get("optimized_metric") or "")
    if cfg.get("fit", True) or metric.startswith(("external/", "shift/")):
        return metric
    return "test/balanced_accuracy"


def fitted_last_checkpoint(trainer: L.Trainer) -> dict[str, Any] | None:
    """The fit's ``last.ckpt``, read safely; None when there is none.

    ddp_spawn fits in workers: the launching trainer learns their step and callback states only
    from it.
    """
    folder = getattr(trainer.checkpoint_callback, "dirpath", None)
    last = Path(folder) / "last.ckpt" if folder else None
    if last is None or not last.is_file():
        return None
    try:
        return read_checkpoint(last)
    except CheckpointError:
        return None


def _recorded_epoch_metrics(trainer: L.Trainer) -> dict[str, Any]:
    callbacks = (fitted_last_checkpoint(trainer) or {}).get("callbacks")
    state = callbacks.get(BestEpochMetrics.__qualname__) if isinstance(callbacks, dict) else None
    if not isinstance(state, dict):
        return {}
    restored = BestEpochMetrics()
    restored.load_state_dict(state)
    return restored.state_dict()
