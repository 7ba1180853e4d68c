"""TensorBoard's HPARAMS tab, as TensorBoard shows it: a session per run, written at its end, with a status
and the recipe; the columns of every run under one logdir."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf
from tensorboard.plugins.hparams import api_pb2
from torch.utils.tensorboard import SummaryWriter

from pneumonia.training.hparams_session import (
    NOT_HYPERPARAMETER_PREFIXES,
    NOT_HYPERPARAMETERS,
    session_hparams,
    write_session,
)
from tests.conftest import ROOT
from tests.tensorboard_tab import hparams_tab


def _config(**extra):
    return OmegaConf.create(
        {
            "model": {"_target_": "pneumonia.model.classifier.XrayClassifier"},
            "optimizer": {"_target_": "torch.optim.SGD", "lr": 0.01},
            "scheduler": None,
            "image_size": 64,
            "seed": 1,
            "data": {"batch_size": 32, "external_tests": {"site_b": "/x"}},
            "trainer": {"max_epochs": 2},
            "shift_suite": {"enabled": True},
            **extra,
        }
    )


def _run(log_dir, scalars, overrides, status):
    """A run's scalars and, at its end, its session (what run.py writes)."""
    with SummaryWriter(str(log_dir)) as writer:
        for tag, value in scalars.items():
            writer.add_scalar(tag, value, 3)
    write_session(log_dir, session_hparams(_config(), {}, overrides, status), status)


def test_a_failed_run_is_a_failed_session_with_its_recipe_and_no_test_columns(tmp_path):
    hparams = session_hparams(_config(), {"optimizer": "sgd"}, ["optimizer.lr=0.01"], "failed")
    with SummaryWriter(str(tmp_path / "run")) as writer:
        writer.add_scalar("val/auroc", 0.75, 3)
    write_session(tmp_path / "run", hparams, "failed")
    tab = hparams_tab(tmp_path)
    session = tab.sessions["run"]
    assert session.status == api_pb2.STATUS_FAILURE and session.hparams["status"] == "failed"
    assert session.hparams["optimizer"] == "sgd" and session.hparams["optimizer.lr"] == 0.01
    assert session.hparams["scheduler"] == "none"
    assert tab.metric_columns == {"val/auroc"} and session.metrics == {"val/auroc": 0.75}


def test_a_rerun_replaces_the_earlier_session(tmp_path):
    _run(tmp_path / "run", {"val/auroc": 0.5}, [], "failed")
    _run(tmp_path / "run", {"val/auroc": 0.6}, [], "completed")
    assert len(list(tmp_path.glob("run/events.out.tfevents.*.hparams"))) == 1
    session = hparams_tab(tmp_path).sessions["run"]
    assert session.status == api_pb2.STATUS_SUCCESS and session.hparams["status"] == "completed"


def test_sweeps_sharing_a_logdir_show_every_sweeps_columns(tmp_path):
    """TensorBoard takes one experiment record's columns for a whole logdir (tensorflow/tensorboard
    #5596): the other sweep's swept keys and external sets would vanish from the tab."""
    _run(tmp_path / "lr_sweep" / "optimizer.lr=0.1", {"test/auroc": 0.9}, ["optimizer.lr=0.1"],
         "completed")  # fmt: skip
    _run(
        tmp_path / "momentum_sweep" / "optimizer.momentum=0.9",
        {"test/auroc": 0.8, "external/site_b/auroc": 0.7},
        ["optimizer.momentum=0.9", "+data.external_tests.site_b=/x"],
        "completed",
    )
    tab = hparams_tab(tmp_path)
    assert {
        "optimizer.lr",
        "optimizer.momentum",
        "data.external_tests.site_b",
    } <= tab.hparam_columns
    assert tab.metric_columns == {"test/auroc", "external/site_b/auroc"}
    momentum = tab.sessions["momentum_sweep/optimizer.momentum=0.9"]
    assert momentum.hparams["optimizer.momentum"] == 0.9
    assert momentum.metrics["external/site_b/auroc"] == pytest.approx(0.7)
    assert tab.sessions["lr_sweep/optimizer.lr=0.1"].hparams["optimizer.lr"] == 0.1


def test_where_and_how_a_run_reports_are_not_hyperparameters():
    overrides = [
        "optimizer.lr=0.003", "run_dir=/tmp/x", "data.root=/data", "trainer.enable_progress_bar=false",
        "callbacks.attribution_maps=null", "hydra.sweep.dir=/s", "+data.external_tests.a=/b", "seed=3",
    ]  # fmt: skip
    hparams = session_hparams(_config(), {}, overrides, "completed")
    assert hparams["optimizer.lr"] == 0.003 and hparams["seed"] == 3.0
    assert hparams["data.external_tests.a"] == "/b"
    for noise in (
        "run_dir",
        "data.root",
        "trainer.enable_progress_bar",
        "callbacks.attribution_maps",
    ):
        assert noise not in hparams
    # Without Hydra's choices, the class names say which option a group holds.
    assert hparams["optimizer"] == "SGD" and hparams["model"] == "XrayClassifier"


def test_what_never_names_a_sweep_job_is_never_a_hyperparameter():
    hydra = OmegaConf.load(ROOT / "conf" / "hydra" / "default.yaml")
    excluded = set(hydra.job.config.override_dirname.exclude_keys)
    prefixed = {key for key in excluded if key.startswith(NOT_HYPERPARAMETER_PREFIXES)}
    assert excluded - prefixed <= set(NOT_HYPERPARAMETERS)
