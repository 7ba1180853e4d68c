"""The ``ddp`` preset through Hydra's command line: 2 CPU processes (ddp_spawn, gloo) against one.

Under DDP every epoch-level value must be synchronised (Lightning warns about each one that is
not) and evaluation shards must not repeat images (Lightning's own DistributedSampler pads them),
so two processes report what one does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.conftest import ROOT, make_subset
from tests.integration.conftest import train

pytestmark = pytest.mark.integration

TWO_PROCESSES = (
    "trainer=ddp",
    "trainer.accelerator=cpu",
    "trainer.devices=2",
    "trainer.strategy=ddp_spawn",
)
# Lightning's warnings about epoch values logged without sync_dist and about padded shards.
DDP_WARNINGS = ("sync_dist=True", "Using `DistributedSampler` with the dataloaders")


def _run(
    *overrides: str, cache_dir: Path, config_name: str | None = None, progress_bar: bool = False
):
    """train.py with overrides, as ``tests.integration.conftest.run_entry`` but with Python's
    warnings left on (it silences them), since what Lightning warns about is checked here."""
    command = [sys.executable, str(ROOT / "train.py")]
    if config_name:
        command += ["--config-name", config_name]
    command += [*overrides, f"trainer.enable_progress_bar={str(progress_bar).lower()}"]
    env = {**os.environ, "PNEUMONIA_CACHE": str(cache_dir)}
    env.pop("PNEUMONIA_DATA", None)
    env.pop("PYTHONWARNINGS", None)
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    if result.returncode != 0:
        raise AssertionError(
            f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
        )
    return result


def _ddp_warnings(result: subprocess.CompletedProcess) -> list[str]:
    output = (result.stdout + result.stderr).splitlines()
    return [line for line in output if any(w in line for w in DDP_WARNINGS)]


def _events(run_dir: Path, prefix: str) -> dict[str, list[tuple[int, float]]]:
    """Every (step, value) of each TensorBoard scalar of ``run_dir`` whose tag starts with ``prefix``.

    Every event is kept: under ddp_spawn the test runs in fresh workers and is logged at step 0,
    after the training steps, which TensorBoard would otherwise take for a restart and purge.
    """
    events = EventAccumulator(str(run_dir / "tensorboard"), purge_orphaned_data=False).Reload()
    return {
        tag: [(event.step, event.value) for event in events.Scalars(tag)]
        for tag in events.Tags()["scalars"]
        if tag.startswith(prefix)
    }


def _scalars(run_dir: Path, prefix: str) -> dict[str, float]:
    """The last value of each scalar :func:`_events` lists."""
    return {tag: values[-1][1] for tag, values in _events(run_dir, prefix).items()}


def test_two_processes_train_with_the_metrics_of_one_and_no_sync_warnings(
    short_run, small_root, cache_dir, tmp_path
):
    run_dir = tmp_path / "ddp"
    result = _run(
        f"data.root={small_root}",
        "image_size=64",
        "debug=limit",
        "trainer.limit_train_batches=2",
        "callbacks.attribution_maps=null",
        f"run_dir={run_dir}",
        *TWO_PROCESSES,
        cache_dir=cache_dir,
        # As a user runs it: the bar (rank zero's) once read the epoch's values alone, and the
        # ranks' collectives mismatched.
        progress_bar=True,
    )
    assert "Starting with 2 processes" in result.stdout + result.stderr
    assert _ddp_warnings(result) == []
    # The same validation and test metrics as one process's run (short_run) logs and reports.
    for prefix in ("val/", "test/"):
        assert set(_scalars(run_dir, prefix)) == set(_scalars(short_run, prefix)) != set()
    # Validation logged after training steps, and the test (run in fresh workers) not logged at
    # step 0, which TensorBoard would take for a restart and hide every curve after it for.
    fitted = max(step for v in _events(run_dir, "val/").values() for step, _ in v)
    assert fitted > 0
    assert all(step >= fitted for v in _events(run_dir, "test/").values() for step, _ in v)
    shown = EventAccumulator(str(run_dir / "tensorboard")).Reload()  # purges as TensorBoard does
    assert [e.step for e in shown.Scalars("val/balanced_accuracy")][-1] == fitted
    # The test's figures beside its metrics: at step 0 they were shown as a restart.
    tested = {step for v in _events(run_dir, "test/").values() for step, _ in v}
    assert [e.step for e in shown.Images("test/confusion_matrix")] == sorted(tested)
    assert tested and min(tested) >= fitted
    report = json.loads((run_dir / "test_metrics.json").read_text())
    one_process = json.loads((short_run / "test_metrics.json").read_text())
    assert set(report) == set(one_process)
    assert set(report["metrics"]) == set(one_process["metrics"])
    # What both ranks logged, synchronised, is what the report says.
    logged = _scalars(run_dir, "test/")
    for name, value in report["metrics"].items():
        assert logged[f"test/{name}"] == pytest.approx(value, abs=1e-6, nan_ok=True), name
    # Every test image counted once: the test split's 13 images, not a padded 14.
    split = (run_dir / "split.csv").read_text().splitlines()[1:]
    assert report["images"] == sum(row.endswith(",test") for row in split) == 13
    checkpoints = {p.name for p in (run_dir / "checkpoints").iterdir()}
    assert "last.ckpt" in checkpoints and any(n.startswith("epoch") for n in checkpoints)


def test_one_checkpoint_evaluates_the_same_on_one_and_two_processes(
    short_run, data_root, cache_dir, tmp_path
):
    # An odd number of images: a padded shard would repeat one and change the figures.
    images = make_subset(data_root, tmp_path / "eval_data", per_class=30, flat=True)
    sorted((images / "PNEUMONIA").iterdir())[-1].unlink()
    checkpoint = next((short_run / "checkpoints").glob("epoch*.ckpt"))
    runs = {}
    for processes, trainer in ((1, ()), (2, TWO_PROCESSES)):
        run_dir = tmp_path / f"eval{processes}"
        result = _run(
            f"ckpt_path={checkpoint}",
            f"data.root={images}",
            f"run_dir={run_dir}",
            *trainer,
            cache_dir=cache_dir,
            config_name="eval",
        )
        assert _ddp_warnings(result) == []
        runs[processes] = run_dir
    one, two = (json.loads((runs[n] / "test_metrics.json").read_text()) for n in (1, 2))
    assert one["images"] == two["images"] == 59
    for key in ("confusion_matrix", "confusion_matrix_at_0.5", "threshold", "temperature"):
        assert one[key] == two[key], key
    for key in ("metrics", "metrics_at_0.5", "calibration"):
        assert two[key] == pytest.approx(one[key], abs=1e-6, nan_ok=True), key
    logged_one, logged_two = (_scalars(runs[n], "test/") for n in (1, 2))
    assert set(logged_one) == set(logged_two) and "test/loss" in logged_one
    assert logged_two == pytest.approx(logged_one, abs=1e-6, nan_ok=True)
    listed = [(runs[n] / "evaluated_images.csv").read_text() for n in (1, 2)]
    assert listed[0] == listed[1] and len(listed[0].splitlines()) == 59 + 1


def test_a_resume_on_two_processes_redraws_a_lost_grid_without_a_hang(
    small_root, cache_dir, tmp_path
):
    # The redraw ends at a barrier: every rank must take the same decision to draw, or the ranks'
    # collectives mismatch.
    run_dir = tmp_path / "run"
    common = (f"data.root={small_root}", "image_size=64", "debug=limit", "test=false")
    train(*common, "trainer.max_epochs=1", f"run_dir={run_dir}", cache_dir=cache_dir)
    grid = run_dir / "explanations" / "val_epoch000.png"
    drawn = grid.read_bytes()
    grid.unlink()  # as a kill while the grid was written, after the checkpoint
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    # The steps as that run took them (bf16 on CPUs that have it; the ddp preset pins 32 bits).
    training = torch.load(checkpoint, weights_only=True)["hyper_parameters"]["training"]
    _run(
        *common,
        "ckpt_path=last",
        f"trainer.precision={training['trainer.precision']}",
        f"run_dir={run_dir}",
        *TWO_PROCESSES,
        cache_dir=cache_dir,
    )
    grids = sorted(p.name for p in (run_dir / "explanations").glob("val_epoch*.png"))
    assert grids == ["val_epoch000.png", "val_epoch001.png"]
    assert grid.read_bytes() == drawn  # the checkpoint's weights, threshold and images
