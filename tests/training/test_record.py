"""The run's record: run_status.json and its TensorBoard session (training/record.py)."""

from __future__ import annotations

from pathlib import Path

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


def test_the_resume_command_keeps_every_override_in_order_and_quotes_what_needs_it():
    import shlex

    from hydra.core.override_parser.overrides_parser import OverridesParser

    from pneumonia.training.record import resume_command

    overrides = ["data.root=/data/a b", "trainer.max_epochs=5", "trainer.max_epochs=2", "run_dir=x"]
    command = shlex.split(resume_command(overrides, Path("/runs/lr=0.1,b")))
    assert command[:5] == ["python", "train.py", *overrides[:3]]  # the last value still wins
    assert command[5:] == ['run_dir="/runs/lr=0.1,b"', "ckpt_path=last"]
    parsed = OverridesParser.create().parse_overrides(command[2:])
    assert parsed[3].value() == "/runs/lr=0.1,b"  # one value, not a sweep over two
