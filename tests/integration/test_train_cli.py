"""train.py end to end through Hydra's command line, on the real X-rays."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.conftest import make_subset
from tests.integration.conftest import train

pytestmark = pytest.mark.integration


def test_fast_dev_run_on_all_the_real_data(data_root, cache_dir, tmp_path):
    run_dir = tmp_path / "fdr"
    result = train(
        f"data.root={data_root}",
        "image_size=64",
        "debug=fdr",
        f"run_dir={run_dir}",
        cache_dir=cache_dir,
    )
    assert "balanced_accuracy" in result.stdout
    rows = (run_dir / "split.csv").read_text().splitlines()
    assert rows[0] == "path,label,patient,split" and len(rows) == 5232 + 1
    report = json.loads((run_dir / "test_metrics.json").read_text())
    assert set(report["metrics"]) >= {
        "balanced_accuracy",
        "precision",
        "recall",
        "specificity",
        "f1",
        "auroc",
    }
    assert (run_dir / "test_confusion_matrix.png").stat().st_size > 1000
    assert (run_dir / ".hydra" / "config.yaml").is_file()


def test_run_folder_holds_checkpoints_logs_and_metrics(short_run):
    checkpoints = sorted(p.name for p in (short_run / "checkpoints").iterdir())
    assert "last.ckpt" in checkpoints and any(
        name.startswith("epoch00-bacc") for name in checkpoints
    )
    events = EventAccumulator(str(short_run / "tensorboard")).Reload()
    assert {"class_weight/NORMAL", "val/balanced_accuracy", "test/auroc"} <= set(
        events.Tags()["scalars"]
    )
    assert "val/confusion_matrix" in events.Tags()["images"]
    report = json.loads((short_run / "test_metrics.json").read_text())
    assert report["checkpoint"].endswith(".ckpt") and "last" not in report["checkpoint"]
    tn_fp, fn_tp = report["confusion_matrix"]
    assert sum(tn_fp) + sum(fn_tp) == report["images"] > 0
    checkpoint = torch.load(
        short_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True
    )
    assert checkpoint["hyper_parameters"]["image_size"] == 64


def test_resume_in_place_from_the_last_checkpoint(short_run, small_root, cache_dir, tmp_path):
    short_run = shutil.copytree(short_run, tmp_path / "run")  # leave the shared run as it was
    before = torch.load(
        short_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True
    )
    assert before["epoch"] == 0
    result = train(
        f"data.root={small_root}",
        "image_size=64",
        "debug=limit",
        "trainer.max_epochs=2",
        f"run_dir={short_run}",
        "ckpt_path=last",
        cache_dir=cache_dir,
    )
    output = result.stdout + result.stderr
    assert f"Restored all states from the checkpoint at {short_run}/checkpoints/last.ckpt" in output
    resumed = output[output.index("Restored all states") :]
    # Only the second epoch ran after restoring, continuing the step count of the first.
    assert "attribution maps for epoch 1 took" in resumed and "for epoch 0 took" not in resumed
    after = torch.load(
        short_run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True
    )
    assert after["global_step"] == 2 * before["global_step"]
    assert sorted(p.name for p in (short_run / "checkpoints").glob("last*")) == ["last.ckpt"]


def test_resume_with_another_architecture_is_refused(short_run, small_root, cache_dir):
    result = train(
        f"data.root={small_root}",
        "image_size=64",
        "model.net.hidden_features=32",
        f"run_dir={short_run}",
        "ckpt_path=last",
        cache_dir=cache_dir,
        check=False,
    )
    assert result.returncode != 0
    assert "was trained with net=" in result.stderr


def test_evaluate_a_checkpoint_on_another_folder(
    short_run, small_root, originals_root, cache_dir, tmp_path
):
    out = tmp_path / "eval"
    result = train(
        f"ckpt_path={short_run}",
        f"data.root={originals_root}",
        f"run_dir={out}",
        config_name="eval",
        cache_dir=cache_dir,
    )
    report = json.loads((out / "test_metrics.json").read_text())
    assert report["images"] == 40  # every full-size original, RGB ones included, is a test image
    assert "last" not in report["checkpoint"]  # a run folder means its best checkpoint
    assert "balanced_accuracy" in result.stdout
    assert len((out / "evaluated_images.csv").read_text().splitlines()) == 41
    # Its status names what it measured, so a table of runs does not rank it as a validation score.
    status = json.loads((out / "run_status.json").read_text())
    assert (
        status["status"] == "completed" and status["optimized_metric"] == "test/balanced_accuracy"
    )
    assert status["score"] == pytest.approx(report["metrics"]["balanced_accuracy"])
    assert "images only" not in result.stdout + result.stderr
    assert report["copies_of_training_images"] == 0
    # The checkpoint's own data: the images it was trained and validated on are counted and warned
    # of (its test split is fine to evaluate on).
    own = train(
        f"ckpt_path={short_run}", f"data.root={small_root}", f"run_dir={tmp_path / 'own'}",
        config_name="eval", cache_dir=cache_dir,
    )  # fmt: skip
    seen = [line for line in (short_run / "split.csv").read_text().splitlines()[1:]
            if line.endswith((",train", ",val"))]  # fmt: skip
    own_report = json.loads((tmp_path / "own" / "test_metrics.json").read_text())
    assert own_report["images"] == 120 and own_report["copies_of_training_images"] == len(seen)
    assert f"{len(seen)} of the 120 evaluated images were in the training or validation split" in (
        own.stdout + own.stderr
    )
    # A folder of one class: what it cannot measure is null, and the log says it cannot rank.
    sick = train(
        f"ckpt_path={short_run}", f"data.root={originals_root / 'PNEUMONIA'}",
        f"run_dir={tmp_path / 'sick'}", config_name="eval", cache_dir=cache_dir,
    )  # fmt: skip
    metrics = json.loads((tmp_path / "sick" / "test_metrics.json").read_text())["metrics"]
    assert metrics["specificity"] is None and metrics["auroc"] is None
    assert "holds PNEUMONIA images only" in sick.stdout + sick.stderr


def test_fit_false_evaluates_on_the_test_split_the_checkpoint_was_trained_with(
    short_run, small_root, cache_dir, tmp_path
):
    # It took the test split of the config's own split settings: with another data.seed, most of
    # its "test" images had trained the model.
    out = tmp_path / "eval"
    train(
        "fit=false", f"ckpt_path={short_run}", f"data.root={small_root}", "data.seed=7",
        f"run_dir={out}", cache_dir=cache_dir,
    )  # fmt: skip
    tested = [
        line
        for line in (short_run / "split.csv").read_text().splitlines()
        if line.endswith(",test")
    ]
    assert json.loads((out / "test_metrics.json").read_text())["images"] == len(tested)
    assert (out / "split.csv").read_text() == (short_run / "split.csv").read_text()


def test_missing_data_root_is_a_clear_error(cache_dir, tmp_path):
    missing = tmp_path / "no_such_folder"
    result = train(
        f"data.root={missing}",
        "debug=fdr",
        f"run_dir={tmp_path / 'r'}",
        cache_dir=cache_dir,
        check=False,
    )
    assert result.returncode != 0
    assert f"data root {missing} does not exist" in result.stderr
    assert "make data" in result.stderr


def test_corrupt_images_are_skipped_and_logged(data_root, cache_dir, tmp_path):
    root = make_subset(data_root, tmp_path / "corrupt", per_class=30)
    (root / "train" / "PNEUMONIA" / "person9999_bacteria_1.jpeg").write_bytes(
        b"\xff\xd8\xff garbage"
    )
    run_dir = tmp_path / "run"
    train(
        f"data.root={root}", "image_size=64", "debug=fdr", f"run_dir={run_dir}", cache_dir=cache_dir
    )
    log = (run_dir / "debug.log").read_text()
    assert "skipping 1 unreadable image(s) of 61" in log and "person9999_bacteria_1.jpeg" in log
    assert (
        "person9999_bacteria_1.jpeg,PNEUMONIA,person9999,skipped"
        in (run_dir / "split.csv").read_text()
    )


def test_multirun_sweeps_optimizers(small_root, cache_dir, tmp_path):
    sweep_dir = tmp_path / "sweep"
    train(
        "-m",
        "optimizer=adam,sgd_momentum",
        f"data.root={small_root}",
        "image_size=64",
        "debug=limit",
        "trainer.max_epochs=1",
        "callbacks.attribution_maps=null",
        f"hydra.sweep.dir={sweep_dir}",
        cache_dir=cache_dir,
    )
    for job in ("optimizer=adam", "optimizer=sgd_momentum"):
        assert (sweep_dir / job / "test_metrics.json").is_file()
    # Each job trained with the optimiser it swept: its checkpoint's optimiser state says so.
    groups = {
        job: torch.load(sweep_dir / job / "checkpoints" / "last.ckpt", weights_only=True)[
            "optimizer_states"
        ][0]["param_groups"][0]
        for job in ("optimizer=adam", "optimizer=sgd_momentum")
    }
    assert "betas" in groups["optimizer=adam"] and "momentum" not in groups["optimizer=adam"]
    assert groups["optimizer=sgd_momentum"]["momentum"] == 0.9
    assert groups["optimizer=sgd_momentum"]["lr"] == 0.01


def test_ddp_on_two_cpu_processes_with_rank_zero_writing(small_root, cache_dir, tmp_path):
    run_dir = tmp_path / "ddp"
    train(
        f"data.root={small_root}", "image_size=64", "debug=limit", "trainer=ddp", "trainer.accelerator=cpu",
        f"run_dir={run_dir}", cache_dir=cache_dir,
    )  # fmt: skip
    log = (run_dir / "debug.log").read_text()
    assert "[rank: 1]" in log  # the second process ran and logs into the same run folder
    assert log.count("attribution maps for") == 3  # 2 validation epochs + the test, rank zero only
    test_rows = sum(
        line.endswith(",test") for line in (run_dir / "split.csv").read_text().splitlines()
    )
    assert test_rows % 2 == 1  # odd: the default sampler would repeat one image to even out ranks
    assert json.loads((run_dir / "test_metrics.json").read_text())["images"] == test_rows
    assert sorted(p.name for p in (run_dir / "explanations").glob("*.png")) == [
        "test.png", "val_epoch000.png", "val_epoch001.png",
    ]  # fmt: skip


def test_ddp_spawn_keeps_statistics_scores_and_the_test_report(small_root, cache_dir, tmp_path):
    run_dir = tmp_path / "spawn"
    train(
        f"data.root={small_root}", "image_size=64", "debug=limit", "trainer=ddp", "trainer.accelerator=cpu",
        "trainer.strategy=ddp_spawn", "callbacks.attribution_maps.num_images=2", f"run_dir={run_dir}",
        cache_dir=cache_dir,
    )  # fmt: skip
    report = json.loads((run_dir / "test_metrics.json").read_text())  # written inside the workers
    assert report["best_val_score"] is not None and report["checkpoint"].endswith(".ckpt")
    hparams = torch.load(report["checkpoint"], map_location="cpu", weights_only=True)[
        "hyper_parameters"
    ]
    assert hparams["pixel_std"] != 0.25 and hparams["data_root"] == str(
        small_root
    )  # not the defaults
