"""The run's record: run_status.json and its TensorBoard session (training/record.py)."""

from __future__ import annotations

from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import OmegaConf

from pneumonia.training import record as record_module
from pneumonia.training.status import read_status


def test_a_session_that_cannot_be_written_leaves_a_completed_run_completed(tmp_path, monkeypatch):
    """The status said completed while the process failed on TensorBoard's HPARAMS session, so a
    sweep rerun skipped a job that had reported an error."""
    tried = []

    def no_disk(*args, **kwargs):
        tried.append(args)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(record_module, "write_session", no_disk)
    cfg = OmegaConf.create({"optimized_metric": "val/balanced_accuracy", "fit": True})
    record = record_module.RunRecord(cfg, tmp_path, [])
    record.watch(None, [TensorBoardLogger(str(tmp_path))], None)
    record.end("completed", score=0.9)  # no exception: the run ended as its status says
    assert tried and read_status(tmp_path)["status"] == "completed"
