"""Files written whole: the old content or the new, never half, and no side file left."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest

from pneumonia import files
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


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _leftover(folder, target: str, pid: int):
    """What written_aside leaves when the process ``pid`` is killed outright while writing."""
    with mock.patch("os.getpid", return_value=pid):
        side = folder / files._side_name(target)
    side.write_text("half")
    return side


def test_side_files_of_killed_writers_are_removed_and_live_ones_kept(tmp_path):
    dead, live = _dead_pid(), os.getppid()
    nested = tmp_path / "explanations"
    nested.mkdir()
    stale = [
        _leftover(tmp_path, "run_status.json", dead),
        _leftover(nested, "val_epoch003.png", dead),
        _leftover(tmp_path, "q" * 251 + ".csv", dead),  # named by a digest
    ]
    kept = [
        _leftover(tmp_path, "metrics.csv", live),  # a writer that is still running
        _leftover(tmp_path, "split.csv", os.getpid()),
        tmp_path / f".notes.{dead}.txt",  # not a side file
        tmp_path / ".draft.partial",  # no process id
        tmp_path / "report.json",
    ]
    deeper = nested / "deeper"
    deeper.mkdir()
    elsewhere = tmp_path.parent / f"{tmp_path.name}_elsewhere"
    elsewhere.mkdir()
    (tmp_path / "linked").symlink_to(elsewhere)
    kept += [  # runs write in their folder and the folders in it, and follow no link
        _leftover(deeper, "notes.txt", dead),
        _leftover(elsewhere, "notes.txt", dead),
    ]
    for path in kept[2:5]:
        path.write_text("a user's")
    (tmp_path / f".folder.{dead}.partial").mkdir()  # not a file: left alone
    assert sorted(files.remove_stale_side_files(tmp_path)) == sorted(stale)
    assert all(path.exists() for path in kept) and not any(p.exists() for p in stale)


def test_only_the_named_targets_side_files_are_removed_when_one_is_named(tmp_path):
    dead = _dead_pid()
    mine = _leftover(tmp_path, "predictions.csv", dead)
    other = _leftover(tmp_path, "predictions.csv.bak", dead)
    nested = tmp_path / "sub"
    nested.mkdir()
    below = _leftover(nested, "predictions.csv", dead)
    assert files.remove_stale_side_files(tmp_path, target="predictions.csv") == [mine]
    assert other.exists() and below.exists()
    assert files.remove_stale_side_files(tmp_path / "missing", target="x.csv") == []


def test_a_run_clears_what_writers_killed_in_its_folder_left_when_it_takes_the_folder(tmp_path):
    from pneumonia.training.status import hold_run_folder

    stale = _leftover(tmp_path, "test_metrics.json", _dead_pid())
    with hold_run_folder(tmp_path):
        assert not stale.exists()


def test_a_rewritten_file_keeps_the_permissions_its_owner_gave_it(tmp_path):
    path = tmp_path / "predictions.csv"
    path.write_text("old")
    path.chmod(0o640)
    write_atomic(path, "new")
    assert path.read_text() == "new" and stat.S_IMODE(path.stat().st_mode) == 0o640


def test_a_process_id_no_process_can_have_is_a_dead_writers(tmp_path):
    # os.kill raises OverflowError beyond a C int: a crafted or corrupt name stopped every run.
    huge = [tmp_path / f".run_status.json.{pid}.partial" for pid in (2**31, 10**20)]
    odd = tmp_path / f".two\nlines.{_dead_pid()}.partial"
    for path in (*huge, odd):
        path.write_text("half")
    assert sorted(files.remove_stale_side_files(tmp_path)) == sorted([*huge, odd])


def test_a_folder_that_cannot_be_locked_keeps_its_side_files(tmp_path, monkeypatch):
    # Without the lock another machine's run may be writing here: its pid means nothing locally.
    from pneumonia import locks
    from pneumonia.training.status import hold_run_folder

    def no_locks(*args, **kwargs):
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(locks, "try_lock", no_locks)
    stale = _leftover(tmp_path, "test_metrics.json", _dead_pid())
    with hold_run_folder(tmp_path):
        assert stale.exists()


def test_a_folder_that_cannot_be_read_is_passed_over(tmp_path, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    stale = _leftover(tmp_path, "split.csv", _dead_pid())
    scandir = os.scandir

    def denied(path):
        if str(path) == str(locked):
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(files.os, "scandir", denied)
    assert files.remove_stale_side_files(tmp_path) == [stale]


def test_a_long_names_digest_side_file_is_found_whatever_its_writers_pid(tmp_path):
    # Whether the digest stands in for the name depends on the writer's pid's length.
    name = "n" * 239
    with mock.patch("os.getpid", return_value=99999999):  # above any pid_max: a dead writer
        side = tmp_path / files._side_name(name)
    assert not side.name.startswith(".nnn")  # that writer needed the digest; a shorter pid may not
    side.write_text("half")
    assert files.remove_stale_side_files(tmp_path, target=name) == [side]


def test_a_figure_is_saved_whole_in_the_format_its_name_says(tmp_path):
    class Figure:
        def __init__(self, fail: bool = False) -> None:
            self.fail, self.calls = fail, []

        def savefig(self, path, **kwargs):
            self.calls.append(kwargs)
            Path(path).write_bytes(b"half a figure")
            if self.fail:
                raise OSError(28, "No space left on device")

    path = tmp_path / "shift_suite.png"
    figure = Figure()
    assert files.save_figure(figure, path, dpi=120) == path
    assert figure.calls == [{"format": "png", "dpi": 120}] and path.read_bytes() == b"half a figure"
    path.write_bytes(b"the old figure")
    with pytest.raises(OSError, match="No space"):
        files.save_figure(Figure(fail=True), path)
    assert path.read_bytes() == b"the old figure" and sorted(tmp_path.iterdir()) == [path]
