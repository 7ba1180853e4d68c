"""Files written whole: the old content or the new, never half, and no side file left."""

from __future__ import annotations

import pytest

from pneumonia.files import write_atomic, written_aside


def test_the_new_content_replaces_the_old_only_when_the_block_ends(tmp_path):
    path = tmp_path / "report.json"
    path.write_text("old")
    with written_aside(path) as partial:
        partial.write_text("new")
        assert path.read_text() == "old"  # a reader during the write sees the old file whole
        assert partial.parent == path.parent and partial.name.startswith(".")
    assert path.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_an_error_while_writing_keeps_the_old_content_and_removes_the_side_file(tmp_path):
    path = tmp_path / "split.csv"
    path.write_text("old")
    with pytest.raises(KeyboardInterrupt), written_aside(path) as partial:
        partial.write_text("half")
        raise KeyboardInterrupt
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["split.csv"]


def test_write_atomic_writes_utf8_text_and_creates_the_file(tmp_path):
    path = write_atomic(tmp_path / "summary.md", "ρ = 0.5\n")
    assert path.read_bytes() == "ρ = 0.5\n".encode()


def test_a_name_as_long_as_a_file_name_may_be_is_written_too(tmp_path):
    path = tmp_path / ("p" * 251 + ".csv")  # 255 bytes: the longest name a file may have
    write_atomic(path, "ok")
    assert path.read_text() == "ok" and len(list(tmp_path.iterdir())) == 1
