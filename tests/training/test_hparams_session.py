"""TensorBoard's HPARAMS session: written at the end, with a status, the recipe, no noise."""

from __future__ import annotations

from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import api_pb2, metadata

from pneumonia.training.hparams_session import session_hparams, session_metric_names, write_session


def _sessions(log_dir):
    events = EventAccumulator(str(log_dir), size_guidance={"tensors": 0})
    events.Reload()
    content = events.PluginTagToContent(metadata.PLUGIN_NAME)
    start = metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG])
    end = metadata.parse_session_end_info_plugin_data(content[metadata.SESSION_END_INFO_TAG])
    experiment = metadata.parse_experiment_plugin_data(content[metadata.EXPERIMENT_TAG])
    return start, end, experiment


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


def test_a_failed_run_is_a_failed_session_with_its_recipe(tmp_path):
    cfg = _config()
    hparams = session_hparams(cfg, {"optimizer": "sgd"}, ["optimizer.lr=0.01"], "failed")
    write_session(tmp_path, hparams, session_metric_names(cfg), "failed")
    start, end, experiment = _sessions(tmp_path)
    assert end.status == api_pb2.STATUS_FAILURE
    assert start.hparams["status"].string_value == "failed"
    assert start.hparams["optimizer"].string_value == "sgd"
    assert start.hparams["optimizer.lr"].number_value == 0.01
    assert start.hparams["scheduler"].string_value == "none"
    metrics = [m.name.tag for m in experiment.metric_infos]
    assert {"val_best/balanced_accuracy", "val/auroc", "test/recall"} <= set(metrics)
    assert {"external/site_b/auroc", "shift/robustness"} <= set(metrics)
    assert "train/loss" not in metrics and "val/loss" not in metrics


def test_a_rerun_replaces_the_earlier_session(tmp_path):
    cfg = _config()
    write_session(tmp_path, session_hparams(cfg, {}, [], "failed"), ["val/auroc"], "failed")
    write_session(tmp_path, session_hparams(cfg, {}, [], "completed"), ["val/auroc"], "completed")
    assert len(list(tmp_path.glob("events.out.tfevents.*.hparams"))) == 1
    start, end, _ = _sessions(tmp_path)
    assert (
        end.status == api_pb2.STATUS_SUCCESS and start.hparams["status"].string_value == "completed"
    )


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
