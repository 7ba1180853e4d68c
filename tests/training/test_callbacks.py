"""RunCheckpoint keeps last.ckpt at the last epoch; StopOnDivergence stops at the first NaN loss."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from pneumonia.errors import TrainingDivergedError
from pneumonia.training.callbacks import RunCheckpoint, StopOnDivergence


class _Scripted(L.LightningModule):
    """A one-weight model whose validation score per epoch is given, and whose loss can go NaN."""

    def __init__(self, val_scores: list[float], nan_at_step: int | None = None) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.val_scores = val_scores
        self.nan_at_step = nan_at_step

    def training_step(self, batch, batch_idx):
        loss = (self.weight - batch[0].mean()) ** 2
        if self.nan_at_step is not None and self.global_step >= self.nan_at_step:
            loss = loss * float("nan")
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val/score", self.val_scores[self.current_epoch])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loader(n: int = 8) -> DataLoader:
    return DataLoader(TensorDataset(torch.randn(n, 1)), batch_size=2)


def _fit(module, callbacks, epochs):
    trainer = L.Trainer(
        max_epochs=epochs, callbacks=callbacks, logger=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0,
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


@pytest.mark.parametrize("nan_at_step", [0, 5, 6])
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


def test_an_infinite_loss_is_a_divergence_too():
    guard = StopOnDivergence(check_every_n_steps=1)

    class Trainer:
        global_step, current_epoch = 3, 1

    guard.on_train_batch_end(Trainer(), None, {"loss": torch.tensor(1.0)}, None, 0)
    with pytest.raises(TrainingDivergedError, match="epoch 1, step 2: the training loss was inf"):
        guard.on_train_batch_end(Trainer(), None, {"loss": torch.tensor(float("inf"))}, None, 0)
