"""Rebuilding the split a checkpoint records (training/checkpoint_data.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pneumonia.errors import CheckpointError
from pneumonia.training.checkpoint_data import checkpoint_split_settings

SPLIT = {"root": "/data", "seed": 42, "split_fractions": [0.8, 0.1, 0.1], "group_by": "patient"}


@pytest.mark.parametrize(
    "split",
    [
        None,
        {"root": 5},
        {**SPLIT, "seed": "42"},
        {**SPLIT, "split_fractions": "abc"},
        {**SPLIT, "group_by": "hospital"},
    ],
)
def test_a_missing_or_malformed_split_record_is_a_checkpoint_error(split):
    with pytest.raises(CheckpointError, match="x.ckpt"):
        checkpoint_split_settings({"split": split}, Path("x.ckpt"), root="/elsewhere")


def test_a_recorded_root_that_is_no_dataset_is_not_walked(tmp_path):
    (tmp_path / "home" / "user").mkdir(parents=True)
    split = {**SPLIT, "root": str(tmp_path / "home")}
    with pytest.raises(CheckpointError, match="pass data.root="):
        checkpoint_split_settings({"split": split}, Path("x.ckpt"), root=None)


def test_data_root_overrides_where_the_checkpoint_says_the_data_was(small_root):
    settings = checkpoint_split_settings({"split": SPLIT}, Path("x.ckpt"), root=str(small_root))
    assert settings["root"] == str(small_root) and settings["seed"] == 42
    recorded = checkpoint_split_settings(
        {"split": {**SPLIT, "root": str(small_root)}}, Path("x.ckpt"), root=None
    )
    assert recorded["root"] == str(small_root)
