"""An Optuna search's bookkeeping: trials still to run, the seed offset, one search per study, and
a plain message when no trial completed."""

from __future__ import annotations

import fcntl
import os

import pytest
from omegaconf import OmegaConf

from pneumonia.errors import SweepError
from pneumonia.sweeps.optuna_study import (
    LOCK_FILE,
    fixed_settings,
    prepare_study,
    remaining_trials,
    run_search,
    sampler_seed,
)


def _config(sweep_dir, storage=None):
    return OmegaConf.create(
        {"hydra": {"sweep": {"dir": str(sweep_dir)},
                   "sweeper": {"study_name": "s", "storage": storage, "n_trials": 3}}}
    )  # fmt: skip


def test_a_new_study_has_every_trial_to_run_and_the_plain_seed(tmp_path):
    storage = f"sqlite:///{tmp_path / 'none.db'}"
    assert remaining_trials(storage, "s", 5) == 5 and sampler_seed(storage, "s", 42) == 42
    assert sampler_seed(storage, "s", None) is None
    with pytest.raises(ValueError, match="0 or more"):
        remaining_trials(storage, "s", -1)


def test_finished_trials_count_and_a_killed_one_is_closed(tmp_path):
    optuna = pytest.importorskip("optuna")
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(study_name="s", storage=storage)
    study.tell(study.ask(), 0.5)
    study.tell(study.ask(), state=optuna.trial.TrialState.PRUNED)  # finished too
    study.tell(study.ask(), state=optuna.trial.TrialState.FAIL)  # to run again
    study.ask()  # left RUNNING by a killed search
    assert remaining_trials(storage, "s", 5) == 3 and sampler_seed(storage, "s", 42) == 46
    prepare_study(_config(tmp_path / "sweep", storage))
    states = [t.state.name for t in optuna.load_study(study_name="s", storage=storage).trials]
    assert states == ["COMPLETE", "PRUNED", "FAIL", "FAIL"]


def test_a_second_search_of_a_running_study_is_refused(tmp_path):
    sweep_dir = tmp_path / "sweep"
    sweep_dir.mkdir()
    held = os.open(sweep_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT)
    fcntl.flock(held, fcntl.LOCK_EX)  # as the other search's process holds it
    try:
        with pytest.raises(SweepError, match="another Optuna search of study 's'"):
            prepare_study(_config(sweep_dir))
    finally:
        os.close(held)
    prepare_study(_config(sweep_dir))  # free again


def _optuna_best_trial_fails():
    raise ValueError("Record does not exist.")  # what Hydra's sweeper gets from study.best_trial


def test_a_search_whose_trials_all_failed_says_so_and_where_the_errors_are(tmp_path):
    optuna = pytest.importorskip("optuna")
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(study_name="s", storage=storage)
    for _ in range(2):
        study.tell(study.ask(), state=optuna.trial.TrialState.FAIL)
    with pytest.raises(SweepError, match=r"no completed trial: all 2 failed.*sweep/summary.md"):
        run_search(_optuna_best_trial_fails, _config(tmp_path / "sweep", storage))
    optuna.create_study(study_name="empty", storage=storage)  # optuna_trials=0 on a new study
    config = _config(tmp_path / "sweep", storage)
    config.hydra.sweeper.study_name = "empty"
    with pytest.raises(SweepError, match="'empty' has no trial: give optuna_trials a number"):
        run_search(_optuna_best_trial_fails, config)


def test_other_errors_of_a_search_are_not_reworded(tmp_path):
    optuna = pytest.importorskip("optuna")
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(study_name="s", storage=storage)
    study.tell(study.ask(), 0.5)  # one trial completed: the error is about something else
    with pytest.raises(ValueError, match="Record does not exist"):
        run_search(_optuna_best_trial_fails, _config(tmp_path / "sweep", storage))
    with pytest.raises(ValueError, match="Record does not exist"):  # in memory: nothing to ask
        run_search(_optuna_best_trial_fails, _config(tmp_path / "sweep2"))


def test_hydra_finds_the_searchs_sweeper_among_its_plugins():
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    from hydra.core.plugins import Plugins
    from hydra.plugins.sweeper import Sweeper

    names = {f"{c.__module__}.{c.__name__}" for c in Plugins.instance().discover(Sweeper)}
    assert "hydra_plugins.pneumonia_optuna.GuardedOptunaSweeper" in names


def _search(sweep_dir, storage, task):
    return OmegaConf.create(
        {"hydra": {"sweep": {"dir": str(sweep_dir)}, "overrides": {"task": task},
                   "sweeper": {"study_name": "s", "storage": storage, "n_trials": 3,
                               "direction": "maximize",
                               "params": {"optimizer.lr": "tag(log, interval(1e-4, 1e-1))"}}}}
    )  # fmt: skip


def test_a_study_refuses_trials_run_under_other_fixed_settings(tmp_path):
    optuna = pytest.importorskip("optuna")
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    smoke = ["debug=limit", "image_size=64", "optuna_trials=2", f"paths.log_dir={tmp_path}"]
    prepare_study(_search(tmp_path / "sweep", storage, smoke))
    study = optuna.load_study(study_name="s", storage=storage)
    assert study.user_attrs["pneumonia_fixed_overrides"] == ["debug=limit", "image_size=64"]
    # The same search continued with more trials: fine.
    prepare_study(_search(tmp_path / "sweep", storage, [*smoke[:2], "optuna_trials=9"]))
    with pytest.raises(SweepError, match=r"fixed settings \['debug=limit', 'image_size=64'\], not "
                                         r"\['image_size=128'\].*study_name=s_2"):  # fmt: skip
        prepare_study(_search(tmp_path / "sweep", storage, ["image_size=128", "optuna_trials=5"]))


def test_fixed_settings_hold_pinned_search_keys_and_the_data_root_not_where_trials_run(tmp_path):
    task = [
        "optimizer.lr=0.01",  # a searched key pinned to one value: Optuna does not search it
        "+optimizer.weight_decay=0.1",
        "paths.cache_dir=/fast/cache", "trainer.devices=2", "data.num_workers=4", "optuna_trials=3",
    ]  # fmt: skip
    config = _search(tmp_path, None, task)
    config.data = {"root": str(tmp_path / "data" / ".." / "data")}
    assert fixed_settings(config) == [
        "+optimizer.weight_decay=0.1", f"data.root={tmp_path / 'data'}", "optimizer.lr=0.01",
    ]  # fmt: skip
    config.hydra.overrides.task = ["optimizer.lr=tag(log, interval(0.001, 0.1))"]  # the space
    assert fixed_settings(config) == [f"data.root={tmp_path / 'data'}"]
