"""Callbacks that keep a run honest: checkpoints a resume can trust, a stop when training diverges,
and the validation metrics of the epoch whose weights are tested.

- :class:`RunCheckpoint` is Lightning's ``ModelCheckpoint`` with three guarantees it lacks in 2.6:
  ``last.ckpt`` is rewritten after every epoch (Lightning rewrites it only when the monitored
  metric improves, so a resume redid the epochs since the best one); every checkpoint is written
  to a temporary file and renamed, so a run killed while saving leaves the previous checkpoint
  intact; and the paths a resumed checkpoint records are only believed inside this run's
  checkpoint folder (Lightning trusts a state without ``dirpath`` whole, and would later delete
  or test whatever paths it names, ``local:///anything`` included).
- :class:`StopOnDivergence` stops the run with :class:`~pneumonia.errors.TrainingDivergedError`
  when the training loss becomes NaN or infinite, naming the epoch, step and loss, before a
  checkpoint of the broken weights is saved or a test reports metrics of them.
- :class:`BestEpochMetrics` keeps every validation metric of the best epoch (by the checkpoint's
  monitor; the last epoch when the final weights are tested) and of the last, and logs the best
  as ``val_best/<metric>``: a sweep compares runs at the weights they test, not at their last
  epoch.
- :class:`StatusProgress` rewrites ``run_status.json`` after every validation epoch, so a killed
  run still shows how far it got and the time it spent.
- :class:`ResumableEarlyStopping` is Lightning's ``EarlyStopping`` whose stop survives a resume.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any
from weakref import proxy

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from lightning.pytorch.callbacks.early_stopping import EarlyStoppingReason

from pneumonia.errors import TrainingDivergedError
from pneumonia.training.status import RunStatus

log = logging.getLogger(__name__)


class RunCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``last.ckpt`` is always the last completed epoch, saved atomically.

    Takes ``ModelCheckpoint``'s arguments.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._last_saved_at_step: int | None = None  # global step of the last last.ckpt written

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning 2 validates at an epoch's end before this hook: an epoch that validated has
        # its last.ckpt already, and one that did not (check_val_every_n_epoch > 1, no
        # validation at all) gets it here.
        due = self._last_is_due(trainer)
        super().on_train_epoch_end(trainer, pl_module)
        if due:
            self._save_last_if_stale(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        due = self._last_is_due(trainer) and not self._should_save_on_train_epoch_end(trainer)
        super().on_validation_end(trainer, pl_module)
        if due:
            self._save_last_if_stale(trainer)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit" and trainer.is_global_zero and self.dirpath:
            # A save the process was killed in; every save writes aside and renames.
            for leftover in Path(self.dirpath).glob("*.ckpt.partial"):
                if leftover.is_file() or leftover.is_symlink():
                    try:
                        leftover.unlink()
                    except OSError as problem:  # not worth stopping a run for
                        log.warning("could not remove %s: %s", leftover, problem)

    def _last_is_due(self, trainer: L.Trainer) -> bool:
        return bool(self.save_last) and not self._should_skip_saving_checkpoint(trainer)

    def _save_last_if_stale(self, trainer: L.Trainer) -> None:
        if self._last_saved_at_step != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def _save_last_checkpoint(self, trainer: L.Trainer, monitor_candidates: dict[str, Any]) -> None:
        super()._save_last_checkpoint(trainer, monitor_candidates)
        self._last_saved_at_step = trainer.global_step

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the state of a resumed run, keeping only paths inside this callback's folder.

        A recorded path is taken by its file name inside ``dirpath`` (so a moved run folder still
        finds its best checkpoint) and dropped when no such file exists; nothing outside
        ``dirpath`` is ever tested, kept or deleted because a checkpoint named it.
        """
        state = dict(state_dict)
        state["dirpath"] = self.dirpath  # Lightning then restores the (cleaned) fields below
        paths = ("best_model_path", "kth_best_model_path", "last_model_path")
        found = {key: self._inside(state.get(key)) for key in paths}
        dropped = [
            f"{key}={state_dict[key]!r}" for key in paths if state_dict.get(key) and not found[key]
        ]
        state.update({key: found[key] or "" for key in paths})
        kept = {}
        for path, score in dict(state.get("best_k_models") or {}).items():
            inside = self._inside(path)
            if inside and Path(inside).name != "last.ckpt" and _finite_number(score):
                kept[inside] = score
        state["best_k_models"] = kept
        # Without a monitor Lightning records its latest save as the best, unranked and unscored.
        unranked = (
            self.monitor is None
            and state.get("monitor") is None
            and not kept
            and Path(state["best_model_path"]).name != "last.ckpt"
        )
        consistent = (
            unranked and not state["kth_best_model_path"] and state.get("best_model_score") is None
        ) or (
            all(state[key] in kept for key in paths[:2] if state[key])
            and _finite_number(
                state.get("best_model_score"), allow_none=not state["best_model_path"]
            )
        )
        if not consistent:
            # Scores and paths that do not agree were not written by this callback: start the
            # ranking afresh rather than believe a score no checkpoint of this run earned.
            log.warning("the resumed checkpoint's ranking of checkpoints is inconsistent; reset")
            state.update(best_k_models={}, best_model_path="", kth_best_model_path="")
            state.update(best_model_score=None, kth_value=self.kth_value)
        if not state["best_model_path"]:
            state["best_model_score"] = None
        if dropped:
            log.warning(
                "the resumed checkpoint records paths outside %s that are not there; ignored: %s",
                self.dirpath,
                ", ".join(dropped),
            )
        super().load_state_dict(state)

    def _inside(self, path: Any) -> str | None:
        """``dirpath / <file name of path>`` if that file exists and is named as a checkpoint
        (``.ckpt``: a user's notes in the folder are nobody's best model), else None."""
        if not isinstance(path, str) or not path or self.dirpath is None:
            return None
        name = Path(path.split("://")[-1]).name
        candidate = Path(self.dirpath) / name
        return str(candidate) if name.endswith(".ckpt") and candidate.is_file() else None

    def _should_remove_checkpoint(self, trainer: L.Trainer, previous: str, current: str) -> bool:
        # Never delete anything outside this run's checkpoint folder, whatever the protocol.
        if "://" in str(previous) or self.dirpath is None:
            return False
        folder = Path(self.dirpath).resolve()
        if Path(previous).resolve().parent != folder:
            return False
        return super()._should_remove_checkpoint(trainer, previous, current)

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        # As ModelCheckpoint._save_checkpoint, but written aside and renamed into place.
        partial = f"{filepath}.partial"
        try:
            trainer.save_checkpoint(partial, self.save_weights_only)
        except OSError as err:  # a full disk or a file size limit: say where, and what is kept
            raise OSError(
                err.errno,
                f"cannot write the checkpoint {partial} ({err.strerror or err}); the checkpoints "
                f"already saved are intact. Free space in {Path(filepath).parent} and resume "
                "with ckpt_path=last",
            ) from err
        if trainer.is_global_zero:
            os.replace(partial, filepath)
        trainer.strategy.barrier("RunCheckpoint.rename")
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))


class StopOnDivergence(Callback):
    """Raise :class:`TrainingDivergedError` at the first non-finite training loss.

    The loss is checked on the device every step without waiting for it (no host synchronisation
    per step); the host looks at the record every ``check_every_n_steps`` steps and always before
    validation and at the end of each epoch, before any checkpoint of that epoch is saved
    (Lightning runs checkpoint callbacks after the others).

    Args:
        check_every_n_steps: how often the host reads the record between epochs.
    """

    def __init__(self, check_every_n_steps: int = 50) -> None:
        self.check_every_n_steps = max(1, int(check_every_n_steps))
        self._first_bad: torch.Tensor | None = None  # (step, epoch, loss); step -1: none yet

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:  # fmt: skip
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if not isinstance(loss, torch.Tensor):
            return
        loss = loss.detach().float().reshape(())
        if self._first_bad is None or self._first_bad.device != loss.device:
            self._first_bad = torch.full((3,), -1.0, device=loss.device)
        # global_step already counts this batch's optimizer step.
        step = torch.full((), float(trainer.global_step - 1), device=loss.device)
        epoch = torch.full((), float(trainer.current_epoch), device=loss.device)
        first = (self._first_bad[0] < 0) & ~torch.isfinite(loss)
        self._first_bad = torch.where(first, torch.stack([step, epoch, loss]), self._first_bad)
        if trainer.global_step % self.check_every_n_steps == 0:
            self._raise_if_diverged(trainer)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._raise_if_diverged(trainer)
            self._raise_if_weights_broken(trainer, pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Finite weights can still be useless: Adam at lr=1e30 makes them ~1e30 and the outputs
        # overflow. A non-finite validation loss stops the run before this epoch's checkpoint.
        loss = trainer.callback_metrics.get("val/loss")
        if trainer.state.fn != "fit" or trainer.sanity_checking or loss is None:
            return
        if not math.isfinite(float(loss)):
            raise TrainingDivergedError(
                f"training diverged by epoch {trainer.current_epoch}, step "
                f"{trainer.global_step - 1}: the validation loss is {float(loss)} (the network's "
                f"outputs are no longer finite). {_WHAT_NOW}"
            )

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._raise_if_diverged(trainer)
        self._raise_if_weights_broken(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._raise_if_diverged(trainer)

    def _raise_if_diverged(self, trainer: L.Trainer) -> None:
        step, epoch, loss = self._first_bad.tolist() if self._first_bad is not None else (-1,) * 3
        # Every rank decides together: a NaN loss on one rank reaches the others' weights only at
        # the next step, and a rank stopping alone would leave them waiting in a collective.
        if not trainer.strategy.reduce_boolean_decision(step >= 0, all=False):
            return
        if step < 0:
            raise TrainingDivergedError(
                f"training diverged by epoch {trainer.current_epoch}, step "
                f"{trainer.global_step - 1}: another process's training loss was not finite. "
                f"{_WHAT_NOW}"
            )
        raise TrainingDivergedError(
            f"training diverged at epoch {int(epoch)}, step {int(step)}: the training loss was "
            f"{loss}. {_WHAT_NOW}"
        )

    @staticmethod
    def _raise_if_weights_broken(trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The loss is computed before the optimizer step: the last step of an epoch can break the
        # weights with a finite loss. One check per epoch, before validation and checkpoints.
        # Buffers too: BatchNorm's running statistics overflow to inf while the loss stays finite.
        tensors = [
            (name, t)
            for named in (pl_module.named_parameters(), pl_module.named_buffers())
            for name, t in named
            if t.is_floating_point()
        ]
        finite = [t.isfinite().all() for _, t in tensors]
        if finite and not bool(torch.stack(finite).all()):
            broken = next(name for name, t in tensors if not bool(t.isfinite().all()))
            raise TrainingDivergedError(
                f"training diverged at epoch {trainer.current_epoch}, step "
                f"{trainer.global_step - 1}: the weights {broken} became NaN or infinite. "
                f"{_WHAT_NOW}"
            )


class BestEpochMetrics(Callback):
    """Remember the validation metrics of the best and of the last epoch; log the best at the end.

    The best epoch is the one the checkpoint callback keeps (``trainer.checkpoint_callback``'s
    ``monitor`` and ``mode``, strictly better as it judges); without a monitor the last epoch is
    the best, since the final weights are the ones tested. The record is part of every
    checkpoint, so a resumed run keeps the epochs before the interruption.

    Args:
        logged_metrics: the names (without ``val/``) logged as ``val_best/<name>`` when fitting ends.
    """

    def __init__(self, logged_metrics: tuple[str, ...] = ()) -> None:
        self.logged_metrics = tuple(logged_metrics)
        self.monitor: str | None = None
        self.mode = "max"
        self.best: dict[str, float] = {}
        self.last: dict[str, float] = {}
        self.best_epoch: int | None = None
        self.epochs = 0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        checkpoint = trainer.checkpoint_callback
        if isinstance(checkpoint, ModelCheckpoint):
            self.monitor, self.mode = checkpoint.monitor, checkpoint.mode

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A resume into another folder keeps no checkpoint of the earlier best epoch (the
        # checkpoint callback ranks this folder's afresh): its metrics must not stand for the
        # weights this run will test.
        checkpoint = trainer.checkpoint_callback
        if (
            self.monitor is not None
            and self.best_epoch is not None
            and isinstance(checkpoint, ModelCheckpoint)
            and not checkpoint.best_model_path
        ):
            self.best, self.best_epoch = {}, None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn != "fit" or trainer.sanity_checking:
            return
        values = {
            name: float(value)
            for name, value in trainer.callback_metrics.items()
            if name.startswith("val/") and _finite_number(value)
        }
        self.last = values
        self.epochs = trainer.current_epoch + 1
        if self._improves(values):
            self.best, self.best_epoch = values, trainer.current_epoch

    def _improves(self, values: dict[str, float]) -> bool:
        if self.monitor is None or self.best_epoch is None:
            return True
        current, best = values.get(self.monitor), self.best.get(self.monitor)
        if current is None:
            return False
        if best is None:
            return True
        return current > best if self.mode == "max" else current < best

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        best = {
            f"val_best/{name}": self.best[f"val/{name}"]
            for name in self.logged_metrics
            if f"val/{name}" in self.best
        }
        if best and trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(best, step=trainer.global_step)

    def state_dict(self) -> dict[str, Any]:
        return {
            "best": dict(self.best),
            "last": dict(self.last),
            "best_epoch": self.best_epoch,
            "epochs": self.epochs,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best = _float_dict(state_dict.get("best"))
        self.last = _float_dict(state_dict.get("last"))
        best_epoch = state_dict.get("best_epoch")
        self.best_epoch = best_epoch if isinstance(best_epoch, int) else None
        epochs = state_dict.get("epochs")
        self.epochs = epochs if isinstance(epochs, int) else 0


def _float_dict(value: Any) -> dict[str, float]:
    """Only the finite numbers of a restored record: a checkpoint is not trusted to hold more."""
    if not isinstance(value, dict):
        return {}
    return {str(k): float(v) for k, v in value.items() if _finite_number(v)}


def _finite_number(value: Any, allow_none: bool = False) -> bool:
    if value is None:
        return allow_none
    if isinstance(value, torch.Tensor):
        return value.numel() == 1 and value.is_floating_point() and bool(value.isfinite())
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


_WHAT_NOW = (
    "The run stops here: no checkpoint of these weights is saved and no test metrics are "
    "reported. Lower the learning rate (optimizer.lr=...), clip gradients "
    "(trainer.gradient_clip_val=1.0) or check the input data; resuming from last.ckpt repeats "
    "the epochs after the last good checkpoint"
)


class StatusProgress(Callback):
    """Record epochs, step and wall time in the run's ``run_status.json`` after each validation."""

    def __init__(self, status: RunStatus) -> None:
        self.status = status

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn != "fit" or trainer.sanity_checking or not trainer.is_global_zero:
            return
        try:
            self.status.update(epochs=trainer.current_epoch + 1, global_step=trainer.global_step)
        except OSError as problem:  # the record is not worth stopping a run for
            log.warning("could not update %s: %s", self.status.path, problem)


class ResumableEarlyStopping(EarlyStopping):
    """``EarlyStopping`` whose decision holds after a resume, and which counts an undefined
    metric as no improvement.

    Lightning's checkpoint keeps why the run stopped but not ``trainer.should_stop``, so a stopped
    run resumed in place (killed while testing, say) trained on past its stop and tested other
    weights than the uninterrupted run.

    A metric is NaN where it is undefined (precision and F1 in an epoch that calls nothing
    PNEUMONIA, recall on a split without pneumonia), and Lightning's ``check_finite`` stopped the
    run there, often at its first epoch. A diverged run is stopped by :class:`StopOnDivergence`
    (non-finite loss or weights), so here NaN is one more epoch without improvement; infinity
    still stops. Takes ``EarlyStopping``'s arguments.
    """

    def _evaluate_stopping_criteria(self, current: torch.Tensor) -> tuple[bool, str | None]:
        if not torch.isnan(current):
            return super()._evaluate_stopping_criteria(current)
        self.wait_count += 1
        if self.wait_count < self.patience:
            return False, f"{self.monitor} is undefined (NaN) this epoch: no improvement"
        self.stopping_reason = EarlyStoppingReason.PATIENCE_EXHAUSTED
        return True, (
            f"Monitored metric {self.monitor} did not improve in the last {self.wait_count} "
            f"records (undefined in the last). Best score: {self.best_score:.3f}. Signaling "
            "Trainer to stop."
        )

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if self.stopping_reason != EarlyStoppingReason.NOT_STOPPED:
            log.info(
                "the resumed run had stopped early after epoch %d (%s): nothing more to train",
                self.stopped_epoch,
                self.stopping_reason_message or self.stopping_reason.value,
            )
            trainer.should_stop = True
