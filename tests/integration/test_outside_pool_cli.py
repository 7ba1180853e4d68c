"""Measuring outside the training pool from the command line: external sets and the shift suite."""

from __future__ import annotations

import json
import shutil

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.integration.conftest import train
from tests.tensorboard_tab import hparams_tab

SUITE = ("shift_suite.perturbations=[contrast,jpeg]", "shift_suite.severities=[1,3]")


@pytest.fixture(scope="module")
def measured_run(small_root, originals_root, cache_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("measured") / "run"
    result = train(
        f"data.root={small_root}",
        "image_size=64",
        "debug=limit",
        "trainer.max_epochs=1",
        "augmentation=light",
        "normalization=per_image",
        "operating_point=balanced_accuracy",
        f"+data.external_tests.originals={originals_root}",
        "shift_suite.enabled=true",
        *SUITE,
        "optimized_metric=shift/robustness",
        f"run_dir={run_dir}",
        cache_dir=cache_dir,
    )
    return run_dir, result


def test_the_best_checkpoint_is_measured_on_external_sets_and_the_shift_suite(measured_run):
    run_dir, result = measured_run
    report = json.loads((run_dir / "test_metrics.json").read_text())
    external = report["external"]["originals"]
    assert external["images"] == 40 and external["folder"].endswith("originals")
    assert external["threshold"] == pytest.approx(report["threshold"])
    assert set(external["metrics"]) >= {"balanced_accuracy", "specificity", "auroc"}
    suite = report["shift_suite"]
    assert {(row["perturbation"], row["severity"]) for row in suite["rows"]} == {
        (p, s) for p in ("contrast", "jpeg") for s in (1, 3)
    }
    mean = sum(row["balanced_accuracy"] for row in suite["rows"]) / 4
    assert suite["score"] == pytest.approx(mean)
    for name in ("shift_suite.csv", "shift_suite.md", "shift_suite.png", "test_reliability.png"):
        assert (run_dir / name).stat().st_size > 0
    assert "Robustness score" in result.stdout
    assert len((run_dir / "external_originals.csv").read_text().splitlines()) == 41


def test_outside_pool_metrics_reach_tensorboard_and_the_hparams_columns(measured_run):
    run_dir, _ = measured_run
    (events_dir,) = {p.parent for p in (run_dir / "tensorboard").rglob("events.out.tfevents.*")}
    events = EventAccumulator(str(events_dir)).Reload()
    tags = set(events.Tags()["scalars"])
    assert {"external/originals/balanced_accuracy", "external/originals/ece"} <= tags
    assert {"shift/robustness", "test/ece", "val/threshold", "val/temperature"} <= tags
    report = json.loads((run_dir / "test_metrics.json").read_text())
    logged = events.Scalars("shift/robustness")[-1].value
    assert logged == pytest.approx(report["shift_suite"]["score"], abs=1e-6)
    tab = hparams_tab(run_dir)
    assert {"external/originals/auroc", "shift/robustness"} <= tab.metric_columns
    (session,) = tab.sessions.values()
    assert session.hparams["augmentation"] == "light"  # the recipe, by option name
    assert session.metrics["shift/robustness"] == pytest.approx(logged)


def test_the_shift_suite_runs_on_any_checkpoint_on_its_own_test_split(
    measured_run, cache_dir, tmp_path
):
    run_dir, _ = measured_run
    out = tmp_path / "shift"
    train(
        f"ckpt_path={run_dir}",
        *SUITE,
        f"run_dir={out}",
        config_name="shift",
        cache_dir=cache_dir,
    )
    trained = json.loads((run_dir / "test_metrics.json").read_text())
    again = json.loads((out / "test_metrics.json").read_text())
    # the same test images, the same stored threshold: the same clean figures and the same suite
    assert again["images"] == trained["images"]
    assert again["metrics"] == pytest.approx(trained["metrics"], nan_ok=True)
    assert again["shift_suite"]["score"] == pytest.approx(trained["shift_suite"]["score"])
    at_study = tmp_path / "shift_at_0.25"
    train(
        f"ckpt_path={run_dir}", *SUITE, "shift_suite.threshold=0.25", f"run_dir={at_study}",
        config_name="shift", cache_dir=cache_dir,
    )  # fmt: skip
    suite = json.loads((at_study / "test_metrics.json").read_text())["shift_suite"]
    assert suite["threshold"] == 0.25 != trained["shift_suite"]["threshold"]


def test_the_shift_suite_refuses_a_checkpoint_whose_split_cannot_be_rebuilt(
    measured_run, small_root, cache_dir, tmp_path
):
    run_dir, _ = measured_run
    # the checkpoint records its data root; a file more under it changes the split
    victim = next((small_root / "train" / "NORMAL").iterdir())
    extra = small_root / "train" / "NORMAL" / ("copy_" + victim.name)
    shutil.copy(victim, extra)
    try:
        result = train(
            f"ckpt_path={run_dir}", f"run_dir={tmp_path / 'out'}", config_name="shift",
            cache_dir=cache_dir, check=False,
        )  # fmt: skip
    finally:
        extra.unlink()
    assert result.returncode != 0
    assert "cannot be rebuilt" in result.stderr and "images" in result.stderr


def test_eval_measures_several_external_folders_at_once(
    measured_run, small_root, originals_root, cache_dir, tmp_path
):
    run_dir, _ = measured_run
    out = tmp_path / "eval"
    result = train(
        f"ckpt_path={run_dir}",
        f"data.root={originals_root}",
        f"+data.external_tests.small={small_root}",
        f"+data.external_tests.originals={originals_root}",
        f"+data.external_tests.sick={originals_root / 'PNEUMONIA'}",
        "optimized_metric=external/small/auroc",
        f"run_dir={out}",
        config_name="eval",
        cache_dir=cache_dir,
    )
    report = json.loads((out / "test_metrics.json").read_text())
    assert report["external"]["small"]["images"] == 120
    assert report["external"]["originals"]["metrics"] == pytest.approx(
        report["metrics"], nan_ok=True
    )
    # The checkpoint's training pool as an "external" set: every image is a copy of one of its
    # images, and said so. The pool is the checkpoint's, not the folder evaluated here.
    assert report["external"]["small"]["copies_of_pool_images"] == 120
    assert report["external"]["originals"]["copies_of_pool_images"] == 0
    assert report["copies_of_training_images"] == 0
    assert (
        "120 of the 120 images of external test set small are copies"
        in result.stdout + result.stderr
    )
    # One class: what cannot be measured is null, and the log says why its figure cannot rank.
    sick = report["external"]["sick"]["metrics"]
    assert sick["specificity"] is None and sick["auroc"] is None
    assert sick["balanced_accuracy"] == sick["recall"]
    assert "external test set sick holds PNEUMONIA images only" in result.stdout + result.stderr


def test_an_optimized_metric_the_run_does_not_produce_is_refused(small_root, cache_dir, tmp_path):
    for metric in ("shift/robustness", "external/site_b/auroc"):
        result = train(
            f"data.root={small_root}", f"optimized_metric={metric}", f"run_dir={tmp_path}",
            cache_dir=cache_dir, check=False,
        )  # fmt: skip
        assert result.returncode != 0 and "is not a metric this run produces" in result.stderr


def test_an_external_folder_that_does_not_exist_is_named(small_root, cache_dir, tmp_path):
    result = train(
        f"data.root={small_root}", "+data.external_tests.site_b=/nonexistent/site_b",
        f"run_dir={tmp_path}", cache_dir=cache_dir, check=False,
    )  # fmt: skip
    assert result.returncode != 0 and "/nonexistent/site_b" in result.stderr
