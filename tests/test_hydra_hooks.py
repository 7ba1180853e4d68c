"""A run folder keeps its original Hydra record; a failed job's traceback lands in its task log;
a sweep job's folder is named by what it sweeps."""

from __future__ import annotations

import logging

from hydra.core.utils import JobReturn, JobStatus
from omegaconf import OmegaConf

from pneumonia.hydra_hooks import (
    MAX_JOB_DIRNAME,
    LogFailedJob,
    job_dirname,
    job_identity,
    record_dir,
)


def test_a_new_folder_records_in_dot_hydra_and_a_used_one_beside_it(tmp_path):
    assert record_dir(str(tmp_path)) == ".hydra"
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text("original: true\n")
    again = record_dir(str(tmp_path))
    assert again.startswith(".hydra/rerun-") and again != record_dir(str(tmp_path))


def test_a_failed_job_writes_its_traceback_to_the_file_log_only(tmp_path, capsys):
    file_handler = logging.FileHandler(tmp_path / "train.log")
    stream_handler = logging.StreamHandler()
    root = logging.getLogger()
    root.addHandler(file_handler)
    root.addHandler(stream_handler)
    try:

        def failing_step():
            raise ValueError("the learning rate was negative")

        job = JobReturn()
        try:
            failing_step()
        except ValueError as err:
            job.return_value = err
        job.status = JobStatus.FAILED
        LogFailedJob().on_job_end(config=None, job_return=job)
        succeeded = JobReturn()
        succeeded.return_value, succeeded.status = 0.9, JobStatus.COMPLETED
        LogFailedJob().on_job_end(config=None, job_return=succeeded)
    finally:
        root.removeHandler(file_handler)
        root.removeHandler(stream_handler)
        file_handler.close()
    text = (tmp_path / "train.log").read_text()
    assert "run failed:\nTraceback (most recent call last):" in text
    assert "in failing_step" in text and "ValueError: the learning rate was negative" in text
    assert "on_job_end" not in text  # starts where the job failed, not in the hook
    assert text.count("run failed") == 1
    err = capsys.readouterr().err
    assert "run failed" not in err  # Hydra prints it on the terminal itself
    assert "Error executing job" not in err  # and says so once, not once more for this hook


def _sweep_root(tmp_path, job_overrides, launched=None, params=None):
    if launched is not None:
        OmegaConf.save({"hydra": {"overrides": {"task": launched}}}, tmp_path / "multirun.yaml")
    return OmegaConf.create(
        {
            "hydra": {
                "overrides": {"task": job_overrides},
                "job": {"config": {"override_dirname": {"exclude_keys": ["run_dir", "data.root"]}}},
                "sweep": {"dir": str(tmp_path)},
                "sweeper": {"params": params or {}},
            }
        }
    )


def test_a_sweep_job_is_named_by_the_values_it_sweeps(tmp_path):
    launched = ["optimizer=adam,sgd", "optimizer.lr=0.001,0.01", "debug=limit", "data.root=/d"]
    job = ["optimizer=sgd", "optimizer.lr=0.01", "debug=limit", "data.root=/d"]
    assert job_dirname(3, _root_=_sweep_root(tmp_path, job, launched)) == (
        "optimizer=sgd,optimizer.lr=0.01"
    )


def test_a_presets_sweeper_params_name_the_job_too(tmp_path):
    root = _sweep_root(
        tmp_path, ["image_size=64", "class_weighting=none", "seed=2"], ["seed=1,2"],
        params={"image_size": "64,128", "class_weighting": "none,balanced"},
    )  # fmt: skip
    assert job_dirname(0, _root_=root) == "class_weighting=none,image_size=64,seed=2"


def test_a_job_typed_in_another_order_gets_the_same_folder(tmp_path):
    # -m optimizer=adam,sgd seed=1,2 rerun as -m seed=1,2 optimizer=adam,sgd: the same four jobs.
    first = _sweep_root(tmp_path, ["optimizer=sgd", "seed=2"], ["optimizer=adam,sgd", "seed=1,2"])
    again = _sweep_root(tmp_path, ["seed=2", "optimizer=sgd"], ["seed=1,2", "optimizer=adam,sgd"])
    assert job_dirname(0, _root_=first) == job_dirname(0, _root_=again) == "optimizer=sgd,seed=2"


def test_without_a_sweep_record_every_override_names_the_job_safely(tmp_path):
    job = ["+data.external_tests.site=/mnt/x", "run_dir=/r", "optimizer.lr=0.5"]
    name = job_dirname(1, _root_=_sweep_root(tmp_path, job))
    assert name.startswith("+data.external_tests.site=_mnt_x,optimizer.lr=0.5-")
    assert job_dirname(7, _root_=_sweep_root(tmp_path, ["run_dir=/r"])) == "7"


def test_a_long_job_name_is_cut_and_kept_unique(tmp_path):
    names = {
        job_dirname(0, _root_=_sweep_root(tmp_path, [f"tags=[{'x' * 300}{i}]"])) for i in range(2)
    }
    assert len(names) == 2
    assert all(len(name.encode()) <= MAX_JOB_DIRNAME and "/" not in name for name in names)


def test_an_optuna_job_is_named_by_its_search_space(tmp_path):
    root = _sweep_root(
        tmp_path, ["optimizer=sgd", "optimizer.lr=0.02", "debug=limit", "optuna_trials=4"],
        params={"optimizer": "choice(adam, sgd)", "optimizer.lr": "tag(log, interval(1e-4, 1e-1))"},
    )  # fmt: skip
    assert job_dirname(0, _root_=root) == "optimizer=sgd,optimizer.lr=0.02"


def test_a_swept_folder_key_names_the_job_and_similar_values_stay_apart(tmp_path):
    launched = ["data.root=/d/a,/d/b", "+tag=a/b,a_b"]
    names = {
        job_dirname(0, _root_=_sweep_root(tmp_path, [f"data.root={root}", f"+tag={tag}"], launched))
        for root in ("/d/a", "/d/b")
        for tag in ("a/b", "a_b")
    }
    assert len(names) == 4  # data.root is swept here, so it names the jobs; a/b is not a_b


def test_the_same_overrides_in_another_order_are_the_same_job():
    assert job_identity(["b=2", "a=1"]) == job_identity(["a=1", "b=2"])


def test_a_sweep_begun_before_names_were_sorted_keeps_its_folders(tmp_path):
    (tmp_path / "seed=2,optimizer=sgd").mkdir()  # named in command-line order by an older version
    root = _sweep_root(tmp_path, ["seed=2", "optimizer=sgd"], ["seed=1,2", "optimizer=adam,sgd"])
    assert job_dirname(0, _root_=root) == "seed=2,optimizer=sgd"
    other = _sweep_root(tmp_path, ["seed=1", "optimizer=sgd"], ["seed=1,2", "optimizer=adam,sgd"])
    assert job_dirname(1, _root_=other) == "optimizer=sgd,seed=1"  # new jobs: sorted
