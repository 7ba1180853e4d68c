"""File locks end with the process that took them, even when it forked children before dying."""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import subprocess
import sys

import pytest

from pneumonia.locks import close_lock_file, exclusive_lock, open_lock_file, try_lock, wait_lock


def test_a_killed_holders_forked_children_do_not_keep_its_lock(tmp_path):
    # As a run killed with SIGKILL while its decoding pool's workers (forked) live on.
    path = tmp_path / "x.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import os, time; from pneumonia.locks import open_lock_file, "
         f"try_lock\nfd = open_lock_file({str(path)!r}); assert try_lock(fd)\n"
         "child = os.fork()\nif child == 0:\n    time.sleep(120); os._exit(0)\n"
         "print(child, flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    child = int(holder.stdout.readline())
    try:
        descriptor = open_lock_file(path)
        assert not try_lock(descriptor)  # held
        holder.kill()
        holder.wait()
        assert try_lock(descriptor, tries=40)  # the orphaned child holds nothing
        close_lock_file(descriptor)
    finally:
        os.kill(child, signal.SIGKILL)


def test_a_file_system_without_locks_is_an_oserror_not_a_busy_lock(tmp_path, monkeypatch):
    descriptor = open_lock_file(tmp_path / "x.lock")

    def no_locks(*args):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.raises(OSError, match="No locks"):
        try_lock(descriptor)
    with pytest.raises(OSError, match="No locks"):
        wait_lock(descriptor)
    close_lock_file(descriptor)


def test_a_refusal_when_the_lock_is_held_is_not_taken_for_a_file_system_without_locks(tmp_path):
    path = tmp_path / "x.lock"
    other = open_lock_file(path)  # another open file: flock treats it as another holder
    assert try_lock(other)

    def refuse(descriptor: int) -> None:
        raise FileExistsError("busy")  # an OSError, as the errors of a lock-less file system

    with pytest.raises(FileExistsError), exclusive_lock(path, "nothing", when_held=refuse):
        pytest.fail("the block ran although the lock was held")
    close_lock_file(other)
    with exclusive_lock(path, "nothing", when_held=refuse) as held:
        assert held.descriptor is not None and not held.waited
