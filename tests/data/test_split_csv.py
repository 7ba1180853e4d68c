"""A run's split.csv is never silently rewritten with another split."""

from __future__ import annotations

import pytest

from pneumonia.data.splits import write_split_csv
from pneumonia.errors import SplitChangedError

NAMES = ("NORMAL", "PNEUMONIA")
PATHS = ["train/NORMAL/a.jpeg", "train/NORMAL/b.jpeg", "train/PNEUMONIA/c.jpeg"]


def _write(path, splits, paths=PATHS):
    labels = [0 if "NORMAL" in p else 1 for p in paths]
    write_split_csv(path, paths, labels, [p[-6] for p in paths], splits, NAMES)


def test_the_same_split_is_accepted_and_the_file_left_alone(tmp_path):
    path = tmp_path / "split.csv"
    _write(path, ["train", "val", "test"])
    stamp = path.stat().st_mtime_ns
    _write(path, ["train", "val", "test"])
    assert path.stat().st_mtime_ns == stamp


@pytest.mark.parametrize(
    ("splits", "paths", "message"),
    [
        (["train", "test", "test"], PATHS, r"1 changed; e.g. train/NORMAL/b.jpeg: val -> test"),
        (["train", "val"], PATHS[:2], r"1 removed.*-train/PNEUMONIA/c.jpeg"),
        (["train"] * 4, [*PATHS, "train/NORMAL/d.jpeg"], r"1 image\(s\) added.*\+train/NORMAL/d"),
    ],
)
def test_another_split_is_refused_naming_the_rows(tmp_path, splits, paths, message):
    path = tmp_path / "split.csv"
    _write(path, ["train", "val", "test"])
    before = path.read_text()
    with pytest.raises(SplitChangedError, match=message) as raised:
        _write(path, splits, paths)
    assert str(path) in str(raised.value) and "data.seed" in str(raised.value)
    assert path.read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["split.csv"]  # no stray temporary file
