"""Kill, resume and fail real training runs through train.py, as a user would."""

from __future__ import annotations

import csv
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pneumonia.training.precision import cpu_precision
from tests.conftest import ROOT, run_folder_held_elsewhere
from tests.integration.conftest import train

pytestmark = pytest.mark.integration

EPOCHS = 3
STEPS_PER_EPOCH = 20


def _resume_copy(run_dir, data_root, cache_dir, *overrides: str):
    """Resume a copy of the short run in place, two epochs in all; the result, unchecked."""
    return train(
        f"data.root={data_root}", "image_size=64", "debug=limit", "trainer.max_epochs=2",
        f"run_dir={run_dir}", "ckpt_path=last", *overrides, cache_dir=cache_dir, check=False,
    )  # fmt: skip


def _tampered_copy(short_run, tmp_path, tamper) -> tuple:
    """A copy of the short run whose ``last.ckpt`` ``tamper(checkpoint)`` changed."""
    run_dir = shutil.copytree(short_run, tmp_path / "run")
    last = run_dir / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    tamper(checkpoint)
    torch.save(checkpoint, last)
    return run_dir, last, checkpoint


def _loadable_epoch(path) -> int | None:
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True)["epoch"])
    except Exception:  # not written yet, or being renamed into place
        return None


def _stopped_after_a_checkpoint(overrides, run_dir, cache_dir, stop) -> tuple[int, str]:
    """Start train.py and send it ``stop`` (a signal) once its ``last.ckpt`` loads; its exit
    status and output."""
    env = {**os.environ, "PNEUMONIA_CACHE": str(cache_dir), "PYTHONWARNINGS": "ignore"}
    log = run_dir.with_name(f"{run_dir.name}.log")  # a file: an unread pipe would fill and block
    with log.open("w") as output:
        process = subprocess.Popen(
            [sys.executable, str(ROOT / "train.py"), *overrides],
            env=env, stdout=output, stderr=subprocess.STDOUT,
        )  # fmt: skip
        last = run_dir / "checkpoints" / "last.ckpt"
        deadline = time.monotonic() + 300
        while (
            _loadable_epoch(last) is None and process.poll() is None and time.monotonic() < deadline
        ):
            time.sleep(0.02)
        assert process.poll() is None, "the run ended before it could be stopped"
        process.send_signal(stop)
        process.wait(timeout=120)
    return process.returncode, log.read_text()


def test_a_run_stopped_by_sigterm_exits_with_an_error_and_says_how_to_resume(
    small_root, cache_dir, tmp_path
):
    """SLURM preempts and `kill` stops with SIGTERM; Lightning then exits without an error code,
    so SLURM, make and CI counted the stopped run a success."""
    run_dir = tmp_path / "run"
    overrides = [
        f"data.root={small_root}", "image_size=64", "trainer.max_epochs=30",
        "trainer.enable_progress_bar=false", "logger=csv", f"run_dir={run_dir}",
    ]  # fmt: skip
    returncode, output = _stopped_after_a_checkpoint(overrides, run_dir, cache_dir, signal.SIGTERM)
    last = run_dir / "checkpoints" / "last.ckpt"
    assert returncode == 128 + signal.SIGTERM
    hint = "stopped by SIGTERM: the run was interrupted; resume it with: python train.py "
    assert hint in output
    # The hint repeats every override: without them the resume would train another run.
    command = shlex.split(output.split(hint, 1)[1].splitlines()[0])
    assert command == [*overrides[:-1], f"run_dir={run_dir}", "ckpt_path=last"]
    assert json.loads((run_dir / "run_status.json").read_text())["status"] == "interrupted"
    stopped_at = _loadable_epoch(last)
    assert stopped_at < 29
    # A resume with other overrides than the stopped attempt's is told what changed.
    shorter = f"trainer.max_epochs={stopped_at + 2}"
    resumed = train(
        *[shorter if o == "trainer.max_epochs=30" else o for o in command],
        cache_dir=cache_dir, extra=(),
    )  # fmt: skip
    assert (
        "with other overrides than its last attempt (dropped: trainer.max_epochs=30; added: "
        f"{shorter})" in resumed.stdout + resumed.stderr
    )


def test_a_sweep_stopped_by_sigterm_summarises_the_stopped_job_and_says_how_to_go_on(
    small_root, cache_dir, tmp_path
):
    """Hydra calls no on_job_end for a SystemExit, so the summary missed the stopped job."""
    sweep_dir = tmp_path / "sweep"
    overrides = [
        "-m", "optimizer.lr=0.001,0.002", f"data.root={small_root}", "image_size=64",
        "trainer.max_epochs=30", "trainer.enable_progress_bar=false", "logger=csv",
        f"hydra.sweep.dir={sweep_dir}",
    ]  # fmt: skip
    job = sweep_dir / "optimizer.lr=0.001"
    sweep_dir.mkdir()  # for the helper's log of the process
    returncode, output = _stopped_after_a_checkpoint(overrides, job, cache_dir, signal.SIGTERM)
    assert returncode == 128 + signal.SIGTERM
    assert f"rerun the sweep with hydra.sweep.dir={sweep_dir} to resume it" in output
    assert json.loads((job / "run_status.json").read_text())["status"] == "interrupted"
    table = (sweep_dir / "summary.md").read_text().splitlines()
    (row,) = [line for line in table if line.startswith("| 1 ")]
    assert "interrupted" in row and "optimizer.lr=0.001" in row


def test_an_interrupted_one_cycle_run_resumes(small_root, cache_dir, tmp_path):
    # OneCycleLR cycles Adam's beta1, so the checkpoint's betas differ from the configured ones.
    run_dir = tmp_path / "run"
    overrides = [
        f"data.root={small_root}", "image_size=64", "scheduler=onecycle", "trainer.max_epochs=3",
        "test=false", "trainer.enable_progress_bar=false", "logger=csv", f"run_dir={run_dir}",
    ]  # fmt: skip
    _stopped_after_a_checkpoint(overrides, run_dir, cache_dir, signal.SIGKILL)
    last = run_dir / "checkpoints" / "last.ckpt"
    assert _loadable_epoch(last) < 2
    train(*overrides, "ckpt_path=last", cache_dir=cache_dir)
    assert _loadable_epoch(last) == 2
    assert json.loads((run_dir / "run_status.json").read_text())["status"] == "completed"


def test_a_killed_run_resumes_without_losing_or_repeating_anything(data_root, cache_dir, tmp_path):
    run_dir = tmp_path / "run"
    overrides = [
        f"data.root={data_root}", "image_size=64", "logger=all", f"trainer.max_epochs={EPOCHS}",
        f"+trainer.limit_train_batches={STEPS_PER_EPOCH}", "+trainer.limit_val_batches=4",
        "+trainer.limit_test_batches=4", "trainer.log_every_n_steps=5",
        "callbacks.attribution_maps.num_images=2", "trainer.enable_progress_bar=false",
        f"run_dir={run_dir}",
    ]  # fmt: skip
    _stopped_after_a_checkpoint(overrides, run_dir, cache_dir, signal.SIGKILL)
    last = run_dir / "checkpoints" / "last.ckpt"
    killed_at = _loadable_epoch(last)
    assert killed_at is not None and killed_at < EPOCHS - 1
    assert not (run_dir / "test_metrics.json").exists()
    split_before = (run_dir / "split.csv").read_bytes()
    killed = json.loads((run_dir / "run_status.json").read_text())
    # Written after each validation, before the checkpoint: it shows how far the run got.
    assert killed["status"] == "running" and killed["epochs"] >= killed_at + 1
    assert killed["wall_time_s"] > 0

    result = train(*overrides, "ckpt_path=last", cache_dir=cache_dir)

    output = result.stdout + result.stderr
    assert f"resuming from {last} (epoch {killed_at}" in output
    checkpoint = torch.load(last, map_location="cpu", weights_only=True)
    assert checkpoint["epoch"] == EPOCHS - 1
    assert checkpoint["global_step"] == EPOCHS * STEPS_PER_EPOCH
    assert (run_dir / "split.csv").read_bytes() == split_before
    assert json.loads((run_dir / "test_metrics.json").read_text())["images"] > 0
    status = json.loads((run_dir / "run_status.json").read_text())
    assert status["status"] == "completed" and status["attempts"] == 2
    assert status["started"] == killed["started"]
    assert status["wall_time_s"] > killed["wall_time_s"]  # both attempts' time

    with open(run_dir / "csv" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    val_epochs = [int(r["epoch"]) for r in rows if r.get("val/balanced_accuracy")]
    assert val_epochs == list(range(EPOCHS))  # every epoch once, the earlier ones kept
    step_rows = [int(r["step"]) for r in rows if r.get("train/loss_step")]
    assert step_rows == sorted(set(step_rows)) and len(step_rows) == EPOCHS * STEPS_PER_EPOCH // 5

    events = EventAccumulator(str(run_dir / "tensorboard")).Reload()
    # "epoch" is logged beside every metric group, several times per step, resumed or not.
    for tag in set(events.Tags()["scalars"]) - {"epoch"}:
        repeated = [s for s, n in Counter(e.step for e in events.Scalars(tag)).items() if n > 1]
        assert not repeated, f"{tag} repeats steps {repeated}"
    # One point per epoch end, and no placeholder at step 0 (the HPARAMS tab needs none).
    epoch_ends = [e.step for e in events.Scalars("val/balanced_accuracy")]
    assert epoch_ends == [STEPS_PER_EPOCH * (k + 1) - 1 for k in range(EPOCHS)]
    # Each epoch's figures once, the checkpoint's epoch included (the resume purged it).
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0}).Reload()
    for tag in ("val/confusion_matrix", "explanations/guided_gradcam/val"):
        assert [e.step for e in events.Images(tag)] == epoch_ends, tag
    grids = sorted(p.name for p in (run_dir / "explanations").glob("val_epoch*.png"))
    assert grids == [f"val_epoch{k:03d}.png" for k in range(EPOCHS)]

    original = yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text())
    assert "ckpt_path=last" not in original and f"run_dir={run_dir}" in original
    (rerun,) = (run_dir / ".hydra").glob("rerun-*")
    assert "ckpt_path=last" in yaml.safe_load((rerun / "overrides.yaml").read_text())


@pytest.mark.parametrize("setting", ["augmentation=strong", "data.num_workers=2"])
def test_a_killed_and_resumed_run_trains_what_the_uninterrupted_run_trained(
    setting, small_root, cache_dir, tmp_path
):
    """Shuffling, augmentation and dropout continue the checkpoint's random stream: the same
    weights to the bit, the same test report. Worker processes draw their seed once per process,
    not once per epoch, so they are tried too."""
    common = [
        f"data.root={small_root}", "image_size=64", setting, f"trainer.max_epochs={EPOCHS}",
        "logger=csv", "trainer.enable_progress_bar=false",
    ]  # fmt: skip
    train(*common, f"run_dir={tmp_path / 'whole'}", cache_dir=cache_dir)
    run_dir = tmp_path / "resumed"
    _stopped_after_a_checkpoint([*common, f"run_dir={run_dir}"], run_dir, cache_dir, signal.SIGKILL)
    assert _loadable_epoch(run_dir / "checkpoints" / "last.ckpt") < EPOCHS - 1
    train(*common, f"run_dir={run_dir}", "ckpt_path=last", cache_dir=cache_dir)

    def weights(run) -> dict:
        last = run / "checkpoints" / "last.ckpt"
        return torch.load(last, map_location="cpu", weights_only=True)["state_dict"]

    whole, resumed = weights(tmp_path / "whole"), weights(run_dir)
    assert whole.keys() == resumed.keys()
    assert all(torch.equal(whole[k], resumed[k]) for k in whole), (
        "the resumed run trained otherwise"
    )

    def report(run) -> tuple:
        metrics = json.loads((run / "test_metrics.json").read_text())
        return metrics["metrics"], Path(metrics["checkpoint"]).name

    assert report(run_dir) == report(tmp_path / "whole")


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("data.seed=7", "data.seed: 42 -> 7"),
        ("data.split_fractions=[0.7,0.2,0.1]", "data.split_fractions: [0.8, 0.1, 0.1] -> [0.7, 0.2, 0.1]"),
        ("data.group_by=image", "data.group_by: 'patient' -> 'image'"),
    ],
)  # fmt: skip
def test_a_resume_that_would_change_the_split_is_refused(
    short_run, small_root, cache_dir, tmp_path, override, named
):
    run_dir = shutil.copytree(short_run, tmp_path / "run")
    split_before = (run_dir / "split.csv").read_bytes()
    status_before = json.loads((run_dir / "run_status.json").read_text())
    result = _resume_copy(run_dir, small_root, cache_dir, override)
    assert result.returncode != 0
    assert "SplitChangedError" in result.stderr and named in result.stderr
    assert (run_dir / "split.csv").read_bytes() == split_before
    # The completed run stays completed, with its score and epochs: the mistyped resume trained
    # nothing.
    assert json.loads((run_dir / "run_status.json").read_text()) == status_before


@pytest.mark.parametrize(
    ("override", "named"),
    [("data.batch_size=16", "data.batch_size=32"),
     # The other precision than the one this CPU trains in (trainer=cpu chooses by the chip).
     (f"trainer.precision={'32-true' if cpu_precision() == 'bf16-mixed' else 'bf16-mixed'}",
      "trainer.precision=")],
)  # fmt: skip
def test_a_resume_taking_its_steps_otherwise_is_refused(
    short_run, small_root, cache_dir, tmp_path, override, named
):
    run_dir = shutil.copytree(short_run, tmp_path / "run")
    status_before = (run_dir / "run_status.json").read_text()
    result = _resume_copy(run_dir, small_root, cache_dir, override)
    assert result.returncode != 0 and f"was trained with {named}" in result.stderr
    assert (run_dir / "run_status.json").read_text() == status_before


def test_a_resume_that_fails_before_training_keeps_the_runs_record_and_report(
    short_run, small_root, cache_dir, tmp_path
):
    # Any failure before training, not only the resume checks: here the trainer cannot be built.
    run_dir = shutil.copytree(short_run, tmp_path / "run")
    status_before = (run_dir / "run_status.json").read_text()
    report_before = (run_dir / "test_metrics.json").read_text()
    result = _resume_copy(run_dir, small_root, cache_dir, "trainer.accelerator=gpu")
    assert result.returncode != 0
    assert (run_dir / "run_status.json").read_text() == status_before
    assert (run_dir / "test_metrics.json").read_text() == report_before


def test_a_run_that_stopped_early_stays_stopped_and_says_so(small_root, cache_dir, tmp_path):
    settings = [
        f"data.root={small_root}", "image_size=64", "debug=limit", "trainer.max_epochs=8",
        "callbacks=early_stopping", "callbacks.early_stopping.patience=1", "logger=csv",
    ]  # fmt: skip
    train(*settings, f"run_dir={tmp_path / 'a'}", cache_dir=cache_dir)
    last = tmp_path / "a" / "checkpoints" / "last.ckpt"
    assert _loadable_epoch(last) < 7  # (debug=limit's two validation batches do not improve)
    steps = torch.load(last, map_location="cpu", weights_only=True)["global_step"]
    # In place (as after a kill while testing): it trains nothing more and tests what it has.
    again = train(*settings, f"run_dir={tmp_path / 'a'}", "ckpt_path=last", cache_dir=cache_dir)
    assert "the resumed run had stopped early" in again.stdout + again.stderr
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == steps
    # Into a new folder: refused with the reason, not "raise trainer.max_epochs".
    elsewhere = train(
        *settings, f"run_dir={tmp_path / 'b'}", f"ckpt_path={last}", cache_dir=cache_dir,
        check=False,
    )  # fmt: skip
    assert elsewhere.returncode != 0 and "stopped early after epoch" in elsewhere.stderr


def test_a_run_folder_another_process_works_in_is_refused(short_run, small_root, cache_dir, tmp_path):  # fmt: skip
    # As an orphaned joblib worker of a sweep killed with SIGKILL still trains its job.
    run_dir = shutil.copytree(short_run, tmp_path / "run")
    status_before = (run_dir / "run_status.json").read_bytes()
    with run_folder_held_elsewhere(run_dir) as holder:
        result = _resume_copy(run_dir, small_root, cache_dir)
    assert result.returncode != 0
    assert f"RunFolderBusyError: another process (pid {holder.pid}) is running in" in result.stderr
    assert (run_dir / "run_status.json").read_bytes() == status_before  # its record untouched


def test_a_finished_sweep_job_trained_on_another_data_root_is_not_skipped(
    short_run, small_root, originals_root
):
    # data.root (or PNEUMONIA_DATA) names no folder: a rerun on other data finds the job finished.
    from omegaconf import OmegaConf

    from pneumonia.errors import ConfigError
    from pneumonia.training.run import _finished_job

    overrides = json.loads((short_run / "run_status.json").read_text())["overrides"]
    same = OmegaConf.create({"data": {"root": str(small_root)}})
    assert _finished_job(short_run, overrides, same)["status"] == "completed"  # skipped
    other = OmegaConf.create({"data": {"root": str(originals_root)}})
    with pytest.raises(ConfigError, match=rf"trained on .*, but this sweep reads {originals_root}"):
        _finished_job(short_run, overrides, other)


def test_a_resume_with_tampered_optimizer_state_is_refused_before_training(
    short_run, small_root, cache_dir, tmp_path
):
    run_dir, last, checkpoint = _tampered_copy(
        short_run,
        tmp_path,
        lambda c: c["optimizer_states"][0]["param_groups"][0].update(weight_decay=0.5),
    )
    result = _resume_copy(run_dir, small_root, cache_dir)
    assert result.returncode != 0
    assert f"{last}'s optimizer state has weight_decay=0.5" in result.stderr
    assert torch.load(last, weights_only=True)["epoch"] == checkpoint["epoch"]  # not trained on


def test_a_resume_with_other_class_weights_is_refused(short_run, small_root, cache_dir, tmp_path):
    # small_root is balanced, so balanced weighting gives (1, 1) too: the record says otherwise.
    run_dir, _, _ = _tampered_copy(
        short_run, tmp_path, lambda c: c["hyper_parameters"].update(class_weights=[2.0, 0.5])
    )
    result = _resume_copy(run_dir, small_root, cache_dir)
    assert result.returncode != 0
    assert "was trained with class weights [2.0, 0.5]" in result.stderr
    assert "would weigh the loss [1.0, 1.0]" in result.stderr


def test_a_resume_on_another_file_list_is_refused(short_run, small_root, cache_dir, tmp_path):
    run_dir = shutil.copytree(short_run, tmp_path / "run")
    root = shutil.copytree(small_root, tmp_path / "root", symlinks=True)
    next((root / "train" / "NORMAL").iterdir()).unlink()
    result = _resume_copy(run_dir, root, cache_dir)
    assert result.returncode != 0
    assert f"data.root: '{small_root}' -> '{root}'" in result.stderr
    assert "number of images found: 120 -> 119" in result.stderr


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["optimizer=sgd", "optimizer.lr=1e12"], "diverged at epoch 0, step 1: the training loss was nan"),
        # One Adam step at lr=1e30: finite loss and weights, outputs that overflow.
        (["optimizer.lr=1e30", "trainer.max_epochs=1", "trainer.limit_train_batches=1"],
         "diverged by epoch 0, step 0: the validation loss is nan"),
    ],
)  # fmt: skip
def test_a_diverged_run_stops_loudly_and_reports_nothing(
    small_root, cache_dir, tmp_path, overrides, message
):
    run_dir = tmp_path / "diverged"
    result = train(
        f"data.root={small_root}", "image_size=64", "debug=limit", *overrides, f"run_dir={run_dir}",
        cache_dir=cache_dir, check=False,
    )  # fmt: skip
    assert result.returncode != 0
    assert message in result.stderr
    assert not (run_dir / "test_metrics.json").exists()
    assert not list(run_dir.glob("checkpoints/*.ckpt"))
    log = (run_dir / "debug.log").read_text()
    assert "run failed:\nTraceback" in log and "TrainingDivergedError" in log


def test_a_run_that_trains_nothing_reports_no_test_metrics(small_root, cache_dir, tmp_path):
    run_dir = tmp_path / "untrained"
    result = train(
        f"data.root={small_root}", "image_size=64", "trainer.max_epochs=0", f"run_dir={run_dir}",
        cache_dir=cache_dir, check=False,
    )  # fmt: skip
    assert result.returncode != 0
    assert "took no training step (trainer.max_epochs=0" in result.stderr
    assert not (run_dir / "test_metrics.json").exists()
    assert "NothingTrainedError" in (run_dir / "train.log").read_text()


def test_a_run_that_ends_before_its_first_validation_reports_no_test_metrics(
    small_root, cache_dir, tmp_path
):
    # Three batches an epoch: max_steps ends the fit in the second epoch, before the third's
    # validation; no config check can tell beforehand in general.
    run_dir = tmp_path / "unvalidated"
    result = train(
        f"data.root={small_root}", "image_size=64", "trainer.max_epochs=10",
        "trainer.check_val_every_n_epoch=3", "+trainer.max_steps=5", "logger=csv",
        f"run_dir={run_dir}", cache_dir=cache_dir, check=False,
    )  # fmt: skip
    assert result.returncode != 0
    assert "the fit ended after 5 training step(s) without a validation" in result.stderr
    assert not (run_dir / "test_metrics.json").exists()
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert json.loads((run_dir / "run_status.json").read_text())["status"] == "failed"


def test_resuming_a_finished_run_into_a_new_folder_trains_and_reports_nothing(
    short_run, small_root, cache_dir, tmp_path
):
    run_dir = tmp_path / "again"
    result = train(
        f"data.root={small_root}", "image_size=64", "debug=limit", "trainer.max_epochs=1",
        f"ckpt_path={short_run / 'checkpoints' / 'last.ckpt'}", f"run_dir={run_dir}",
        cache_dir=cache_dir, check=False,
    )  # fmt: skip
    assert result.returncode != 0
    assert "was already trained for trainer.max_epochs=1" in result.stderr
    assert not (run_dir / "test_metrics.json").exists()
