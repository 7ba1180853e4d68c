"""run_status.json says how a run ended, and survives being read while it is written."""

from __future__ import annotations

import json
import os

import pytest

from pneumonia.errors import RunFolderBusyError
from pneumonia.training.status import (
    LOCK_FILE,
    STATUS_FILE,
    RunStatus,
    error_line,
    hold_run_folder,
    metric_mode,
    read_status,
    run_is_live,
)
from tests.conftest import run_folder_held_elsewhere


def test_a_run_is_running_until_it_ends_then_completed_with_its_score(tmp_path):
    status = RunStatus(tmp_path, ["optimizer=sgd"], "val/balanced_accuracy")
    record = read_status(tmp_path)
    assert record["status"] == "running" and record["finished"] is None
    assert record["overrides"] == ["optimizer=sgd"] and record["mode"] == "max"
    status.update(epochs=3, best_val={"val/auroc": 0.9})
    status.end("completed", score=0.91)
    record = read_status(tmp_path)
    assert record["status"] == "completed" and record["score"] == 0.91 and record["epochs"] == 3
    assert record["finished"] is not None and record["wall_time_s"] >= 0
    assert not list(tmp_path.glob("*.partial"))


def test_a_failed_run_records_the_first_line_of_its_error(tmp_path):
    status = RunStatus(tmp_path, [], "val/loss")
    status.end("failed", error=ValueError("lr was negative\nsecond line"))
    record = read_status(tmp_path)
    assert record["status"] == "failed" and record["error"] == "ValueError: lr was negative"
    assert record["mode"] == "min" and record["score"] is None


def test_non_finite_scores_and_tensors_are_stored_as_json(tmp_path):
    torch = pytest.importorskip("torch")
    status = RunStatus(tmp_path, [], "val/auroc")
    status.update(best_val={"val/auroc": torch.tensor(0.75), "val/loss": float("nan")})
    status.end("completed", score=float("inf"))
    record = json.loads((tmp_path / STATUS_FILE).read_text())  # strict JSON: no NaN tokens
    assert record["best_val"] == {"val/auroc": 0.75, "val/loss": None} and record["score"] is None


@pytest.mark.parametrize("content", ["", "{not json", "[1, 2]"])
def test_an_unreadable_status_reads_as_none(tmp_path, content):
    (tmp_path / STATUS_FILE).write_text(content)
    assert read_status(tmp_path) is None
    assert read_status(tmp_path / "missing") is None


def test_metric_modes_and_error_lines():
    assert metric_mode("val/loss") == metric_mode("test/ece") == "min"
    assert metric_mode("external/x/auroc") == metric_mode("shift/robustness") == "max"
    assert error_line(KeyboardInterrupt()) == "stopped by Ctrl-C or a signal (KeyboardInterrupt)"
    assert error_line(SystemExit(1)) == "stopped by Ctrl-C or a signal (SystemExit)"
    assert error_line(ValueError("bad value\nmore")) == "ValueError: bad value"


def test_the_error_line_of_a_refused_config_value_names_the_refusal_not_the_target():
    from hydra.errors import InstantiationException

    wrapped = InstantiationException(
        "Error in call to target 'lightning.pytorch.trainer.trainer.Trainer':\n"
        "TypeError(\"Trainer.__init__() got an unexpected keyword argument 'max_epoch'\")\n"
        "full_key: trainer"
    )
    wrapped.__cause__ = TypeError(
        "Trainer.__init__() got an unexpected keyword argument 'max_epoch'"
    )
    assert error_line(wrapped) == (
        "TypeError: Trainer.__init__() got an unexpected keyword argument 'max_epoch' "
        "(building trainer)"
    )


def test_updates_record_the_time_so_far_and_a_resume_in_place_adds_to_it(tmp_path):
    first = RunStatus(tmp_path, [], "val/auroc")
    first.update(epochs=1)
    spent = read_status(tmp_path)["wall_time_s"]
    assert spent is not None and spent >= 0  # a run killed now leaves this
    started = read_status(tmp_path)["started"]
    record = json.loads((tmp_path / STATUS_FILE).read_text())
    record["wall_time_s"] = 100.0
    (tmp_path / STATUS_FILE).write_text(json.dumps(record))

    second = RunStatus(tmp_path, [], "val/auroc", continues=True)
    second.end("completed", score=0.9)
    record = read_status(tmp_path)
    assert record["attempts"] == 2 and record["started"] == started
    assert 100.0 <= record["wall_time_s"] < 160.0
    RunStatus(tmp_path, [], "val/auroc", continues=True).end("completed")
    assert read_status(tmp_path)["attempts"] == 3


def test_a_new_run_in_a_used_folder_starts_its_own_clock(tmp_path):
    RunStatus(tmp_path, [], "val/auroc").end("failed", error=ValueError("x"))
    record = json.loads((tmp_path / STATUS_FILE).read_text())
    record["wall_time_s"], record["started"] = 100.0, "2020-01-01T00:00:00"
    (tmp_path / STATUS_FILE).write_text(json.dumps(record))
    RunStatus(tmp_path, [], "val/auroc").end("completed")
    record = read_status(tmp_path)
    assert record["attempts"] == 1 and record["wall_time_s"] < 100.0
    assert record["started"] != "2020-01-01T00:00:00"


def test_one_process_at_a_time_works_in_a_run_folder(tmp_path):
    assert run_is_live(tmp_path) is None  # a folder from before the lock
    # Another process holds the folder, as an orphaned joblib worker of a killed sweep does.
    with run_folder_held_elsewhere(tmp_path) as holder:
        assert run_is_live(tmp_path) is True
        busy = pytest.raises(RunFolderBusyError, match=rf"pid {holder.pid}\) is running in")
        with busy, hold_run_folder(tmp_path):
            pass
    assert run_is_live(tmp_path) is False  # the kernel let go of a killed holder's lock
    with hold_run_folder(tmp_path):
        assert (tmp_path / LOCK_FILE).read_text().strip() == str(os.getpid())
        assert run_is_live(tmp_path) is True
    with hold_run_folder(tmp_path):  # released on leaving: the same process may run it again
        pass


def test_a_file_system_without_locks_runs_unguarded_with_a_warning(tmp_path, monkeypatch, caplog):
    import errno
    import fcntl

    def no_locks(*args):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with hold_run_folder(tmp_path):  # not refused as if another process held it
        pass
    assert "concurrent runs in it are not refused" in caplog.text
    assert run_is_live(tmp_path) is None
