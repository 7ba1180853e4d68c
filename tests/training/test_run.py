"""Pieces of ``training/run.py`` that need no training: rebuilding a checkpoint's split, the score."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from pneumonia.errors import CheckpointError
from pneumonia.training.run import _best_score, _checkpoint_split_settings

SPLIT = {"root": "/data", "seed": 42, "split_fractions": [0.8, 0.1, 0.1], "group_by": "patient"}


@pytest.mark.parametrize(
    "split",
    [
        None,
        {"root": 5},
        {**SPLIT, "seed": "42"},
        {**SPLIT, "split_fractions": "abc"},
        {**SPLIT, "group_by": "hospital"},
    ],
)
def test_a_missing_or_malformed_split_record_is_a_checkpoint_error(split):
    with pytest.raises(CheckpointError, match="x.ckpt"):
        _checkpoint_split_settings({"split": split}, Path("x.ckpt"), root="/elsewhere")


def test_a_recorded_root_that_is_no_dataset_is_not_walked(tmp_path):
    (tmp_path / "home" / "user").mkdir(parents=True)
    split = {**SPLIT, "root": str(tmp_path / "home")}
    with pytest.raises(CheckpointError, match="pass data.root="):
        _checkpoint_split_settings({"split": split}, Path("x.ckpt"), root=None)


def test_data_root_overrides_where_the_checkpoint_says_the_data_was(small_root):
    settings = _checkpoint_split_settings({"split": SPLIT}, Path("x.ckpt"), root=str(small_root))
    assert settings["root"] == str(small_root) and settings["seed"] == 42
    recorded = _checkpoint_split_settings(
        {"split": {**SPLIT, "root": str(small_root)}}, Path("x.ckpt"), root=None
    )
    assert recorded["root"] == str(small_root)


def test_the_score_of_an_unmonitored_val_metric_is_that_of_the_kept_weights():
    # The checkpoint keeps the best balanced-accuracy epoch; a sweep optimising val/auroc must be
    # told that epoch's AUROC (the weights it tests), not the last epoch's.
    trainer = SimpleNamespace(callback_metrics={"val/auroc": torch.tensor(0.47)})
    checkpoint = SimpleNamespace(
        monitor="val/balanced_accuracy", best_model_score=torch.tensor(0.9)
    )
    best_val = {"val/balanced_accuracy": 0.9, "val/auroc": 0.88}
    assert _best_score(trainer, checkpoint, "val/auroc", best_val) == pytest.approx(0.88)
    assert _best_score(trainer, checkpoint, "val/balanced_accuracy", best_val) == pytest.approx(0.9)
    assert _best_score(trainer, None, "val/auroc", best_val) == pytest.approx(0.47)  # final weights
    # NaN at the kept epoch (best_val leaves it out): no score, not the last epoch's.
    assert _best_score(trainer, checkpoint, "val/auroc", {"val/balanced_accuracy": 0.9}) is None


def test_a_session_that_cannot_be_written_leaves_a_completed_run_completed(tmp_path, monkeypatch):
    """The status said completed while the process failed on TensorBoard's HPARAMS session, so a
    sweep rerun skipped a job that had reported an error."""
    from lightning.pytorch.loggers import TensorBoardLogger
    from omegaconf import OmegaConf

    import pneumonia.training.run as run_module
    from pneumonia.training.status import read_status

    def no_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(run_module, "write_session", no_disk)
    cfg = OmegaConf.create({"optimized_metric": "val/balanced_accuracy", "fit": True})
    record = run_module.RunRecord(cfg, tmp_path, [])
    record.watch(None, [TensorBoardLogger(str(tmp_path))], None)
    record.end("completed", score=0.9)  # no exception: the run ended as its status says
    assert read_status(tmp_path)["status"] == "completed"
