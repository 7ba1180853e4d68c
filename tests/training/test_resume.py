"""A resume continues the same run: same model, same optimizer and schedule, same split."""

from __future__ import annotations

from pathlib import Path

import pytest

from pneumonia.errors import CheckpointError, SplitChangedError
from pneumonia.training.resume import ResumePoint

NET = {"_target_": "pneumonia.model.study_cnn.StudyCNN", "image_size": 64}
SAVED = {
    "net": NET,
    "image_size": 64,
    "optimizer": {"_target_": "torch.optim.Adam", "lr": 0.00175},
    "scheduler": None,
    "split": {"root": "/data", "seed": 42, "split_fractions": [0.8, 0.1, 0.1], "images": 10},
}
POINT = ResumePoint(Path("/runs/a/checkpoints/last.ckpt"), SAVED, global_step=40, epoch=3)


def test_the_same_settings_resume():
    POINT.check_same_model(dict(SAVED))
    POINT.check_same_split(dict(SAVED["split"]))


@pytest.mark.parametrize(
    ("key", "value", "named"),
    [
        ("optimizer", {"_target_": "torch.optim.Adam", "lr": 0.5}, "optimizer="),
        ("scheduler", {"_target_": "torch.optim.lr_scheduler.CosineAnnealingLR", "T_max": 20}, "scheduler="),
        ("image_size", 96, "image_size=64, but this run configures image_size=96"),
        ("net", {**NET, "dropout": 0.1}, "net="),
    ],
)  # fmt: skip
def test_other_model_or_optimisation_settings_are_refused(key, value, named):
    with pytest.raises(CheckpointError, match=f"{POINT.path} was trained with {named}"):
        POINT.check_same_model({**SAVED, key: value})


def test_every_changed_split_setting_is_named_with_old_and_new_values():
    with pytest.raises(SplitChangedError) as raised:
        POINT.check_same_split({**SAVED["split"], "seed": 7, "images": 11})
    message = str(raised.value)
    assert "data.seed: 42 -> 7" in message and "number of images found: 10 -> 11" in message
    assert "data.root" not in message


def test_a_checkpoint_without_a_recorded_split_is_left_to_split_csv():
    ResumePoint(POINT.path, {**SAVED, "split": None}, 40, 3).check_same_split({"seed": 7})


def test_only_a_checkpoint_below_the_run_folder_is_a_resume_in_place():
    assert POINT.is_in("/runs/a") and not POINT.is_in("/runs/b")


def test_a_run_from_before_the_recipe_groups_resumes_with_their_defaults():
    new = {
        **SAVED,
        "augmentation": None,
        "normalization": {"_target_": "pneumonia.model.normalization.DatasetStandardization"},
        "operating_point": {
            "_target_": "pneumonia.metrics.operating_point.FixedThreshold",
            "threshold": 0.5,
        },
        "label_smoothing": 0.0,
    }
    POINT.check_same_model(new)  # SAVED has none of these keys
    strong = {"_target_": "pneumonia.model.augmentation.BatchAugmentation", "rotation": 5.0}
    with pytest.raises(CheckpointError, match="augmentation=None, but this run configures"):
        POINT.check_same_model({**new, "augmentation": strong})


def test_logs_continue_after_the_last_step_the_checkpoint_holds(tmp_path):
    told = []

    class Logger:
        def continue_after(self, step):
            told.append(step)

    # A checkpoint at global step 16 holds steps up to 15; the next batch logs at 16, which the
    # interrupted process may have logged already.
    ResumePoint(tmp_path / "last.ckpt", {}, 16, 2).continue_logs([Logger(), object()])
    assert told == [15]
