"""Sweeps as a user runs them: folders named by overrides, one ranked table, honest TensorBoard,
failed jobs marked, a stopped sweep finished by rerunning it, and one copy of every log line."""

from __future__ import annotations

import fcntl
import json
import os

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import api_pb2

from pneumonia.sweeps.optuna_study import LOCK_FILE
from tests.integration.conftest import train
from tests.tensorboard_tab import hparams_tab

pytestmark = pytest.mark.integration

GOOD, DIVERGING = "optimizer.lr=0.001", "optimizer.lr=1e+30"


def _sweep(small_root, cache_dir, sweep_dir, *extra):
    return train(
        "-m", "optimizer.lr=0.001,1e30", f"data.root={small_root}", "image_size=64", "debug=limit",
        "callbacks.attribution_maps=null", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
        f"hydra.sweep.dir={sweep_dir}", *extra, cache_dir=cache_dir, check=False,
    )  # fmt: skip


@pytest.fixture(scope="module")
def sweep(small_root, cache_dir, tmp_path_factory):
    sweep_dir = tmp_path_factory.mktemp("sweep") / "multirun"
    result = _sweep(small_root, cache_dir, sweep_dir)
    return sweep_dir, result


def _status(job_dir):
    return json.loads((job_dir / "run_status.json").read_text())


def test_jobs_are_named_by_what_they_sweep_and_failures_are_recorded(sweep):
    sweep_dir, result = sweep
    assert result.returncode != 0  # Hydra reports the failed job when the sweep ends
    assert sorted(p.name for p in sweep_dir.iterdir() if p.is_dir()) == [GOOD, DIVERGING]
    good, failed = _status(sweep_dir / GOOD), _status(sweep_dir / DIVERGING)
    assert good["status"] == "completed" and good["epochs"] == 2 and good["score"] is not None
    assert good["best_val"]["val/balanced_accuracy"] == good["score"]
    assert failed["status"] == "failed" and failed["error"].startswith("TrainingDivergedError")


def test_the_sweep_is_ranked_in_one_table_with_the_failed_job_last(sweep):
    sweep_dir, _ = sweep
    table = (sweep_dir / "summary.md").read_text()
    rows = [
        line for line in table.splitlines() if line.startswith("| 1 ") or line.startswith("| 2 ")
    ]
    assert "completed" in rows[0] and "0.001" in rows[0]
    assert "failed: TrainingDivergedError" in rows[1]
    assert (sweep_dir / "summary.csv").is_file()


def test_tensorboard_has_no_placeholders_and_marks_the_failed_run(sweep):
    sweep_dir, _ = sweep
    tab = hparams_tab(sweep_dir)
    good = tab.sessions[f"{GOOD}/tensorboard"]
    assert good.status == api_pb2.STATUS_SUCCESS and good.hparams["status"] == "completed"
    assert good.hparams["optimizer.lr"] == 0.001
    assert {"test/balanced_accuracy", "val_best/balanced_accuracy"} <= set(good.metrics)
    events = EventAccumulator(str(sweep_dir / GOOD / "tensorboard"))
    events.Reload()
    for tag in ("val/balanced_accuracy", "test/balanced_accuracy", "val_best/balanced_accuracy"):
        steps = [event.step for event in events.Scalars(tag)]
        assert steps and 0 not in steps, f"{tag} has a placeholder at step 0: {steps}"
    failed = tab.sessions[f"{DIVERGING}/tensorboard"]
    assert failed.status == api_pb2.STATUS_FAILURE and failed.hparams["status"] == "failed"
    assert not [tag for tag in failed.metrics if tag.startswith("test/")]


def test_every_console_line_is_printed_once(sweep):
    _, result = sweep
    output = result.stdout + result.stderr
    assert output.count("GPU available") == 2  # once per job
    assert "Tip:" not in output and "DataLoader 0" not in output  # no advert, no second table
    assert output.count("balanced_accuracy   ") == 1  # the completed job's test table


def test_a_rerun_skips_finished_jobs_and_resumes_interrupted_ones(sweep, small_root, cache_dir):
    sweep_dir, _ = sweep
    good = sweep_dir / GOOD
    record = _status(good)
    events_before = sorted(p.name for p in (good / "tensorboard").iterdir())
    again = _sweep(small_root, cache_dir, sweep_dir)
    assert "finished before" in again.stdout + again.stderr
    assert sorted(p.name for p in (good / "tensorboard").iterdir()) == events_before

    record["status"] = "running"  # as a job killed mid-run leaves it
    (good / "run_status.json").write_text(json.dumps(record))
    again = _sweep(small_root, cache_dir, sweep_dir)
    log = (good / "debug.log").read_text()
    assert "was interrupted: resuming it from" in log and "checkpoints/last.ckpt" in log
    # Logged only once the checkpoint is read for the fit (a job started afresh ends alike).
    assert f"resuming from {good / 'checkpoints' / 'last.ckpt'} (epoch" in log
    resumed = _status(good)
    # It resumed at its last epoch: nothing was trained again.
    assert resumed["status"] == "completed" and resumed["global_step"] == record["global_step"]


def _optuna(small_root, cache_dir, log_dir, trials):
    return train(
        "hparams_search=optuna", f"optuna_trials={trials}", f"paths.log_dir={log_dir}",
        f"data.root={small_root}", "debug=limit", "callbacks.attribution_maps=null",
        "hydra.sweeper.params.image_size='choice(32, 64)'", cache_dir=cache_dir,
    )  # fmt: skip


def test_a_stopped_optuna_search_continues_where_it_stopped(small_root, cache_dir, tmp_path):
    optuna = pytest.importorskip("optuna")  # the sweep extra; `make install` installs it
    storage = f"sqlite:///{tmp_path / 'optuna' / 'pneumonia.db'}"
    _optuna(small_root, cache_dir, tmp_path, trials=1)
    study = optuna.load_study(study_name="pneumonia", storage=storage)
    assert [t.state.name for t in study.trials] == ["COMPLETE"]
    study.ask()  # as a search killed mid-trial leaves it: RUNNING for ever

    _optuna(small_root, cache_dir, tmp_path, trials=2)  # the rest of a 2-trial search
    states = [
        t.state.name for t in optuna.load_study(study_name="pneumonia", storage=storage).trials
    ]
    assert states == ["COMPLETE", "FAIL", "COMPLETE"]
    result = _optuna(small_root, cache_dir, tmp_path, trials=2)  # nothing left to do
    assert "2 trial(s) complete, 0 to run" in result.stdout + result.stderr
    assert len(optuna.load_study(study_name="pneumonia", storage=storage).trials) == 3
    jobs = [p for p in (tmp_path / "optuna" / "pneumonia").iterdir() if p.is_dir()]
    assert len(jobs) == 2 and all(p.name.startswith("class_weighting=") for p in jobs)
    assert (tmp_path / "optuna" / "pneumonia" / "summary.md").is_file()


def test_an_optuna_search_that_cannot_run_or_completes_nothing_says_why(cache_dir, tmp_path):
    pytest.importorskip("optuna")
    search = ("hparams_search=optuna", f"paths.log_dir={tmp_path}", f"data.root={tmp_path / 'no'}")
    lock_dir = tmp_path / "optuna" / "pneumonia"
    lock_dir.mkdir(parents=True)
    held = os.open(lock_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT)
    fcntl.flock(held, fcntl.LOCK_EX)  # as another search of the study holds it
    try:
        refused = train(*search, "optuna_trials=1", cache_dir=cache_dir, check=False)
    finally:
        os.close(held)
    assert refused.returncode != 0 and "another Optuna search of study" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert not (tmp_path / "optuna" / "pneumonia.db").exists()  # no trial was started

    failed = train(*search, "optuna_trials=2", cache_dir=cache_dir, check=False)
    assert failed.returncode != 0
    assert "has no completed trial: all 2 failed" in failed.stderr, failed.stderr[-2000:]
    assert "Traceback" not in failed.stderr and "Record does not exist" not in failed.stderr


def test_submitit_local_runs_the_jobs_in_their_folders(small_root, cache_dir, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    sweep_dir = tmp_path / "submitit"
    train(
        "-m", "hydra/launcher=submitit_local", "optimizer=adam,sgd", f"data.root={small_root}",
        "image_size=64", "debug=limit", "callbacks.attribution_maps=null",
        f"hydra.sweep.dir={sweep_dir}", cache_dir=cache_dir,
    )  # fmt: skip
    for job in ("optimizer=adam", "optimizer=sgd"):
        assert _status(sweep_dir / job)["status"] == "completed"
    assert list((sweep_dir / ".submitit").iterdir())  # submitit's own records
    assert "| optimizer |" in (sweep_dir / "summary.md").read_text()
