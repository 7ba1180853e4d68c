"""RunCheckpoint keeps last.ckpt at the last epoch; StopOnDivergence stops at the first NaN loss."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from pneumonia.errors import TrainingDivergedError
from pneumonia.training.callbacks import (
    BestEpochMetrics,
    ResumableEarlyStopping,
    RunCheckpoint,
    StopOnDivergence,
)


class _Scripted(L.LightningModule):
    """A one-weight model whose validation score per epoch is given, and whose loss can go NaN."""

    def __init__(
        self,
        val_scores: list[float],
        nan_at_step: int | None = None,
        break_at_step: int | None = None,
        val_loss_nan_epoch: int | None = None,
        broken: str = "weight",
    ) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.register_buffer("running_var", torch.ones(1))  # as BatchNorm's statistics
        self.val_scores = val_scores
        self.nan_at_step = nan_at_step
        self.break_at_step = break_at_step
        self.broken = broken
        self.val_loss_nan_epoch = val_loss_nan_epoch

    def on_train_batch_end(self, outputs, batch, batch_idx):
        # As an optimizer step that overflows: the loss was finite, the weights are not.
        if self.global_step - 1 == self.break_at_step:
            with torch.no_grad():
                getattr(self, self.broken).fill_(float("inf"))

    def training_step(self, batch, batch_idx):
        loss = (self.weight - batch[0].mean()) ** 2
        if self.nan_at_step is not None and self.global_step >= self.nan_at_step:
            loss = loss * float("nan")
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val/score", self.val_scores[self.current_epoch])
        nan = self.current_epoch == self.val_loss_nan_epoch
        self.log("val/loss", float("nan") if nan else 0.1)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loader(n: int = 8) -> DataLoader:
    return DataLoader(TensorDataset(torch.randn(n, 1)), batch_size=2)


def _fit(module, callbacks, epochs, **trainer_settings):
    # Without a checkpoint callback of the test's, Lightning would add one saving into the cwd.
    checkpointing = any(isinstance(c, ModelCheckpoint) for c in callbacks)
    trainer_settings.setdefault("enable_checkpointing", checkpointing)
    trainer = L.Trainer(
        max_epochs=epochs, callbacks=callbacks, logger=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, **trainer_settings,
    )  # fmt: skip
    trainer.fit(module, train_dataloaders=_loader(), val_dataloaders=_loader(2))
    return trainer


def _checkpoint(tmp_path) -> RunCheckpoint:
    return RunCheckpoint(
        dirpath=tmp_path, filename="best-{epoch}", monitor="val/score", mode="max", save_top_k=1,
        save_last=True, enable_version_counter=False,
    )  # fmt: skip


def test_last_checkpoint_is_the_last_epoch_when_the_best_is_earlier(tmp_path):
    _fit(_Scripted(val_scores=[0.9, 0.5, 0.4, 0.3]), [_checkpoint(tmp_path)], epochs=4)
    last = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert last["epoch"] == 3 and last["global_step"] == 16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best-epoch=0.ckpt", "last.ckpt"]


def test_last_checkpoint_follows_epochs_without_validation(tmp_path):
    # With validation every other epoch, last.ckpt was written only after validations: a run
    # stopped after an epoch without one lost it.
    seen = []

    class Watch(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):  # runs before the checkpoint's hook
            seen.append(trainer.current_epoch)

    _fit(_Scripted(val_scores=[0.5, 0.6, 0.7]), [Watch(), _checkpoint(tmp_path)], epochs=3,
         check_val_every_n_epoch=2)  # fmt: skip
    last = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert seen == [0, 1, 2] and last["epoch"] == 2 and last["global_step"] == 12
    _fit(_Scripted(val_scores=[0.5]), [_checkpoint(tmp_path / "one")], epochs=1,
         check_val_every_n_epoch=2)  # fmt: skip
    assert torch.load(tmp_path / "one" / "last.ckpt", weights_only=True)["epoch"] == 0


def test_resuming_from_last_runs_only_the_remaining_epochs(tmp_path):
    scores = [0.9, 0.5, 0.4, 0.3, 0.2]
    _fit(_Scripted(scores), [_checkpoint(tmp_path)], epochs=3)
    trained_epochs = []

    class Count(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            trained_epochs.append(trainer.current_epoch)

    trainer = L.Trainer(
        max_epochs=5, callbacks=[_checkpoint(tmp_path), Count()], logger=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(_Scripted(scores), _loader(), _loader(2), ckpt_path=tmp_path / "last.ckpt")
    assert trained_epochs == [3, 4]


def test_a_resume_into_another_folder_reports_the_best_epoch_it_tests(tmp_path):
    # The new folder ranks its own checkpoints afresh; the earlier best epoch's metrics stayed
    # as val_best while another epoch's weights were tested.
    scores = [0.9, 0.5, 0.6, 0.4]
    _fit(_Scripted(scores), [_checkpoint(tmp_path / "a"), BestEpochMetrics()], epochs=2)
    epochs, checkpoint = BestEpochMetrics(), _checkpoint(tmp_path / "b")
    resumed = L.Trainer(
        max_epochs=4, callbacks=[checkpoint, epochs], logger=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0,
    )  # fmt: skip
    resumed.fit(_Scripted(scores), _loader(), _loader(2), ckpt_path=tmp_path / "a" / "last.ckpt")
    assert Path(checkpoint.best_model_path).name == "best-epoch=2.ckpt"
    assert epochs.best_epoch == 2 and epochs.best["val/score"] == pytest.approx(0.6)


def test_a_run_that_stopped_early_stays_stopped_when_resumed(tmp_path):
    # Lightning keeps why EarlyStopping stopped, not that the trainer should stop: a stopped run
    # resumed in place (killed while testing) trained on and tested other weights.
    scores = [0.9, 0.5, 0.4, 0.3, 0.2, 0.1]

    def stopper():
        return ResumableEarlyStopping(monitor="val/score", mode="max", patience=1)

    first = _fit(_Scripted(scores), [_checkpoint(tmp_path), stopper()], epochs=6)
    assert first.current_epoch == 2  # stopped after epoch 1
    resumed = L.Trainer(
        max_epochs=6, callbacks=[_checkpoint(tmp_path), stopper()], logger=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )  # fmt: skip
    resumed.fit(_Scripted(scores), _loader(), _loader(2), ckpt_path=tmp_path / "last.ckpt")
    assert resumed.global_step == first.global_step


@pytest.mark.parametrize(
    ("scores", "patience", "epochs_trained"),
    [
        ([0.5, float("nan"), float("nan"), 0.6, 0.7], 3, 5),  # undefined twice, then better
        ([0.5, float("nan"), float("nan"), 0.4, 0.7], 2, 3),  # two epochs without improvement
        ([0.5, float("inf"), 0.6], 5, 2),  # infinity is not undefined: check_finite stops
    ],
)
def test_an_undefined_metric_is_an_epoch_without_improvement(scores, patience, epochs_trained):
    """Precision is NaN in an epoch that calls nothing PNEUMONIA; Lightning stopped there."""
    stopper = ResumableEarlyStopping(monitor="val/score", mode="max", patience=patience)
    trainer = _fit(_Scripted(scores), [stopper], epochs=len(scores))
    assert trainer.current_epoch == epochs_trained
    assert stopper.best_score == max(s for s in scores[:epochs_trained] if math.isfinite(s))


def test_a_save_the_run_was_killed_in_is_cleared_when_it_starts_again(tmp_path):
    leftover = tmp_path / "best-epoch=7.ckpt.partial"
    leftover.write_bytes(b"half a checkpoint")
    kept = tmp_path / "notes.partial"
    kept.write_text("not ours")
    folder = tmp_path / "folder.ckpt.partial"  # not a save: kept, and no reason to stop
    folder.mkdir()
    _fit(_Scripted([0.5]), [_checkpoint(tmp_path)], epochs=1)
    assert not leftover.exists() and kept.exists() and folder.is_dir()
    assert list(tmp_path.glob("*.ckpt.partial")) == [folder]


def test_a_checkpoint_that_cannot_be_written_names_its_path(tmp_path, monkeypatch):
    import errno

    def full_disk(trainer, filepath, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(L.Trainer, "save_checkpoint", full_disk)
    with pytest.raises(
        OSError, match=r"cannot write the checkpoint .*best-epoch=0.ckpt.partial \(No space"
    ):
        _fit(_Scripted([0.5]), [_checkpoint(tmp_path)], epochs=1)


def test_checkpoints_are_written_aside_and_renamed(tmp_path, monkeypatch):
    written = []
    real_save = L.Trainer.save_checkpoint

    def spy(trainer, filepath, *args, **kwargs):
        written.append(str(filepath))
        assert not str(filepath).endswith(".ckpt")  # never straight into the final name
        return real_save(trainer, filepath, *args, **kwargs)

    monkeypatch.setattr(L.Trainer, "save_checkpoint", spy)
    _fit(_Scripted([0.9, 0.5]), [_checkpoint(tmp_path)], epochs=2)
    assert written and all(path.endswith(".partial") for path in written)
    assert not list(tmp_path.glob("*.partial"))
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["epoch"] == 1


@pytest.mark.parametrize("nan_at_step", [0, 3, 5, 7])  # 4 steps an epoch: 3 and 7 end one
def test_a_nan_loss_stops_the_run_naming_epoch_step_and_loss(tmp_path, nan_at_step):
    module = _Scripted(val_scores=[0.1, 0.2, 0.3], nan_at_step=nan_at_step)
    guard = StopOnDivergence(check_every_n_steps=50)  # only the epoch-end checks can see it
    with pytest.raises(TrainingDivergedError) as raised:
        _fit(module, [guard, _checkpoint(tmp_path)], epochs=3)
    epoch = nan_at_step // 4
    assert f"at epoch {epoch}, step {nan_at_step}: the training loss was nan" in str(raised.value)
    saved = {p.name for p in tmp_path.glob("*.ckpt")}
    # Only epochs that ended before the NaN have checkpoints; none holds the diverged weights.
    for name in saved:
        checkpoint = torch.load(tmp_path / name, weights_only=True)
        assert checkpoint["global_step"] <= nan_at_step
        assert torch.isfinite(checkpoint["state_dict"]["weight"]).all()
    assert bool(saved) == (epoch > 0)


class _Strategy:
    """One rank of several: ``others_diverged`` is what the other ranks report."""

    def __init__(self, others_diverged: bool = False) -> None:
        self.others_diverged = others_diverged
        self.decisions: list[bool] = []

    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        assert all is False  # any rank's divergence stops every rank
        self.decisions.append(decision)
        return decision or self.others_diverged


def test_an_infinite_loss_is_a_divergence_too():
    guard = StopOnDivergence(check_every_n_steps=1)

    class Trainer:
        global_step, current_epoch = 3, 1
        strategy = _Strategy()

    guard.on_train_batch_end(Trainer(), None, {"loss": torch.tensor(1.0)}, None, 0)
    with pytest.raises(TrainingDivergedError, match="epoch 1, step 2: the training loss was inf"):
        guard.on_train_batch_end(Trainer(), None, {"loss": torch.tensor(float("inf"))}, None, 0)


def test_every_rank_stops_when_another_ranks_loss_diverged():
    guard = StopOnDivergence(check_every_n_steps=2)

    class Trainer:
        global_step, current_epoch = 3, 0
        strategy = _Strategy(others_diverged=False)

    trainer = Trainer()
    guard.on_train_batch_end(trainer, None, {"loss": torch.tensor(0.5)}, None, 0)
    assert trainer.strategy.decisions == []  # not a check step: no collective, no host sync
    trainer.global_step = 4
    guard.on_train_batch_end(trainer, None, {"loss": torch.tensor(0.5)}, None, 0)
    assert trainer.strategy.decisions == [False]  # every rank joins the decision
    trainer.strategy.others_diverged = True
    trainer.global_step = 6
    with pytest.raises(TrainingDivergedError, match="step 5: another process's training loss"):
        guard.on_train_batch_end(trainer, None, {"loss": torch.tensor(0.5)}, None, 0)


@pytest.mark.parametrize("broken", ["weight", "running_var"])
def test_weights_broken_by_an_epochs_last_step_stop_the_run_before_its_checkpoint(tmp_path, broken):
    # running_var: BatchNorm's statistics overflow to inf under a huge learning rate while the
    # loss stays finite; the checkpoints of those weights could not even be loaded.
    module = _Scripted(val_scores=[0.1, 0.2, 0.3], break_at_step=7, broken=broken)  # epoch 1's last
    with pytest.raises(
        TrainingDivergedError, match=f"epoch 1, step 7: the weights {broken} became"
    ):
        _fit(module, [StopOnDivergence(), _checkpoint(tmp_path / broken)], epochs=3)
    assert torch.load(tmp_path / broken / "last.ckpt", weights_only=True)["epoch"] == 0


def _crafted_resume(tmp_path, state_changes):
    """A checkpoint of a real run whose checkpoint-callback state was edited by someone else."""
    first = tmp_path / "first"
    _fit(_Scripted([0.5, 0.4]), [_checkpoint(first)], epochs=1)
    checkpoint = torch.load(first / "last.ckpt", weights_only=True)
    (key,) = [k for k in checkpoint["callbacks"] if k.startswith("RunCheckpoint")]
    state = checkpoint["callbacks"][key]
    for field, value in state_changes.items():
        if value is None:
            state.pop(field, None)
        else:
            state[field] = value
    path = tmp_path / "crafted.ckpt"
    torch.save(checkpoint, path)
    return path


def test_a_resumed_checkpoint_cannot_make_the_run_delete_or_test_other_files(tmp_path):
    victim_file = tmp_path / "victim" / "important.txt"
    victim_dir = tmp_path / "victim" / "folder"
    victim_dir.mkdir(parents=True)
    victim_file.write_text("keep me")
    other = tmp_path / "other.ckpt"
    other.write_bytes(b"a stranger's weights")
    path = _crafted_resume(
        tmp_path,
        {
            "dirpath": None,  # Lightning then trusts every path below
            "last_model_path": f"local://{victim_file}",
            "kth_best_model_path": str(victim_dir),
            "best_k_models": {str(victim_dir): torch.tensor(0.0), str(other): torch.tensor(9.9)},
            "best_model_path": str(other),
            "best_model_score": torch.tensor(9.9),
        },
    )
    run_folder = tmp_path / "resumed"
    callback = _checkpoint(run_folder)
    trainer = L.Trainer(
        max_epochs=3, callbacks=[callback], logger=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(_Scripted([0.5, 0.6, 0.7]), _loader(), _loader(2), ckpt_path=path)
    assert victim_file.read_text() == "keep me" and victim_dir.is_dir() and other.exists()
    assert callback.best_model_path == str(run_folder / "best-epoch=2.ckpt")
    assert sorted(p.name for p in run_folder.iterdir()) == ["best-epoch=2.ckpt", "last.ckpt"]


def test_a_moved_run_still_finds_its_best_checkpoint(tmp_path):
    path = _crafted_resume(tmp_path, {"dirpath": "/where/it/was"})
    moved = tmp_path / "first"  # the checkpoints are here now, the state names the old folder
    callback = _checkpoint(moved)
    callback.load_state_dict(torch.load(path, weights_only=True)["callbacks"][
        next(k for k in torch.load(path, weights_only=True)["callbacks"] if k.startswith("Run"))
    ])  # fmt: skip
    assert callback.best_model_path == str(moved / "best-epoch=0.ckpt")
    assert callback.last_model_path == str(moved / "last.ckpt")


def test_a_non_finite_validation_loss_stops_the_run_before_its_checkpoint(tmp_path):
    # Finite weights whose outputs overflow (Adam at lr=1e30): only the validation loss shows it.
    module = _Scripted(val_scores=[0.1, 0.2, 0.3], val_loss_nan_epoch=1)
    with pytest.raises(
        TrainingDivergedError, match="by epoch 1, step 7: the validation loss is nan"
    ):
        _fit(module, [StopOnDivergence(), _checkpoint(tmp_path)], epochs=3)
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["epoch"] == 0


@pytest.mark.parametrize(
    "changes",
    [
        {"best_model_path": "/x/last.ckpt", "best_model_score": torch.tensor(2.0)},
        {"best_k_models": {"/x/last.ckpt": torch.tensor(2.0)}, "best_model_path": "/x/last.ckpt"},
        {"best_model_score": "abc"},
        {"best_model_score": torch.tensor(float("nan"))},
        {"kth_best_model_path": "/x/last.ckpt"},
    ],
)
def test_a_forged_ranking_is_reset_not_believed(tmp_path, changes):
    path = _crafted_resume(tmp_path, changes)
    run_folder = tmp_path / "first"  # resumed in place: its files are all there
    callback = _checkpoint(run_folder)
    trainer = L.Trainer(
        max_epochs=2, callbacks=[callback], logger=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(_Scripted([0.5, 0.4]), _loader(), _loader(2), ckpt_path=path)
    # The ranking restarted: epoch 1's own score (0.4) is the best this resumed run has seen.
    assert callback.best_model_path == str(run_folder / "best-epoch=1.ckpt")
    assert float(callback.best_model_score) == pytest.approx(0.4)


def _unmonitored(folder) -> RunCheckpoint:
    # As the robust presets: no monitor, the final weights kept and tested.
    return RunCheckpoint(dirpath=folder, filename="final-{epoch}", monitor=None, save_last=True)


def test_a_run_without_a_monitor_resumes_its_latest_save_without_a_warning(tmp_path, caplog):
    # Lightning records its latest save as the best, unranked: it was taken for a forgery, and
    # every test of such a run warned twice (the second time that an existing file was missing).
    _fit(_Scripted([0.5, 0.4, 0.3]), [_unmonitored(tmp_path)], epochs=2)
    state = torch.load(tmp_path / "last.ckpt", weights_only=True)["callbacks"]
    (key,) = [k for k in state if k.startswith("RunCheckpoint")]
    callback = _unmonitored(tmp_path)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pneumonia"):
        callback.load_state_dict(state[key])
    assert [r.getMessage() for r in caplog.records if r.name.startswith("pneumonia")] == []
    assert callback.best_model_path == str(tmp_path / "final-epoch=1.ckpt")
    # Into a callback that ranks, the same unranked record is not believed.
    ranking = _checkpoint(tmp_path)
    with caplog.at_level(logging.WARNING, logger="pneumonia"):
        ranking.load_state_dict(state[key])
    assert "inconsistent; reset" in caplog.text and "not there" not in caplog.text
    assert ranking.best_model_path == ""


@pytest.mark.parametrize("forged_best", ["notes.txt", "last.ckpt"])
def test_an_unranked_record_cannot_make_the_run_delete_a_file_that_is_not_its_checkpoint(
    tmp_path, forged_best
):
    _fit(_Scripted([0.5, 0.4, 0.3]), [_unmonitored(tmp_path)], epochs=2)
    notes = tmp_path / "notes.txt"
    notes.write_text("a user's notes beside the checkpoints")
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=True)
    (key,) = [k for k in checkpoint["callbacks"] if k.startswith("RunCheckpoint")]
    checkpoint["callbacks"][key]["best_model_path"] = str(tmp_path / forged_best)
    torch.save(checkpoint, tmp_path / "forged.ckpt")
    callback = _unmonitored(tmp_path)
    trainer = L.Trainer(
        max_epochs=3, callbacks=[callback], logger=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(
        _Scripted([0.5, 0.4, 0.3]), _loader(), _loader(2), ckpt_path=tmp_path / "forged.ckpt"
    )
    assert notes.read_text() == "a user's notes beside the checkpoints"
    assert (tmp_path / "last.ckpt").is_file()
    assert callback.best_model_path == str(tmp_path / "final-epoch=2.ckpt")


@pytest.mark.parametrize(
    ("mode", "scores", "best_epoch"),
    [("max", [0.5, 0.9, 0.7, 0.9], 1), ("min", [0.5, 0.2, 0.7, 0.2], 1), ("max", [0.3, 0.1], 0)],
)
def test_best_epoch_metrics_follow_the_checkpoints_monitor(tmp_path, mode, scores, best_epoch):
    record = BestEpochMetrics(logged_metrics=("score",))
    checkpoint = RunCheckpoint(
        dirpath=tmp_path, monitor="val/score", mode=mode, save_top_k=1, save_last=True,
        enable_version_counter=False,
    )  # fmt: skip
    _fit(_Scripted(scores), [record, checkpoint], epochs=len(scores))
    # A tie is not an improvement, as ModelCheckpoint judges it.
    assert record.best_epoch == best_epoch
    assert record.best["val/score"] == pytest.approx(scores[best_epoch])
    assert record.last["val/score"] == pytest.approx(scores[-1]) and record.epochs == len(scores)
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)["callbacks"]["BestEpochMetrics"]
    assert saved["best_epoch"] == best_epoch  # travels with the checkpoint for a resume


def test_without_a_monitor_the_last_epoch_is_the_best():
    record = BestEpochMetrics()
    _fit(_Scripted([0.9, 0.2, 0.4]), [record], epochs=3)
    assert record.best_epoch == 2 and record.best["val/score"] == pytest.approx(0.4)


def test_best_epoch_metrics_are_logged_as_val_best_once_fitting_ends():
    logged = []

    class Logger(L.pytorch.loggers.Logger):
        name, version = "spy", "0"

        def log_metrics(self, metrics, step=None):
            logged.append((dict(metrics), step))

        def log_hyperparams(self, *args, **kwargs):
            pass

    record = BestEpochMetrics(logged_metrics=("score", "absent"))
    trainer = L.Trainer(
        max_epochs=2, callbacks=[record], logger=Logger(), enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0, log_every_n_steps=1000,
        enable_checkpointing=False,
    )  # fmt: skip
    trainer.fit(_Scripted([0.6, 0.8]), _loader(), _loader(2))
    best = [(m, s) for m, s in logged if any(k.startswith("val_best/") for k in m)]
    assert best == [({"val_best/score": pytest.approx(0.8)}, 8)]


def test_a_restored_epoch_record_keeps_only_finite_numbers():
    record = BestEpochMetrics()
    record.load_state_dict(
        {
            "best": {"val/a": 0.5, "val/b": float("nan"), "val/c": "x"},
            "last": [1],
            "best_epoch": "3",
        }
    )
    assert record.best == {"val/a": 0.5} and record.last == {} and record.best_epoch is None
