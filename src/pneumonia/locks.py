"""Advisory file locks for what several processes share: a run folder, an image cache, a sweep's
summary, an Optuna study.

A lock (``flock``) ends with the process that took it, however that process ends: the kernel
drops it when the last descriptor of its open file is closed. Python opens descriptors
non-inheritable, so programs started with ``exec`` never hold one; and a forked child (a decoding
pool's worker, a DataLoader worker) closes its copies as it starts, so it cannot keep the lock of
a parent killed with SIGKILL alive for as long as the child lingers.

A file system without locks (some network mounts) makes :func:`try_lock` and :func:`wait_lock`
raise ``OSError``; :func:`exclusive_lock` then runs its block unguarded, with a warning.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# Descriptors of lock files this process has open; a forked child closes its copies of them.
_OPEN: set[int] = set()
# errno values that mean "another process holds it"; any other is a file system without locks.
_HELD_ELSEWHERE = frozenset({errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES})


def _close_in_child() -> None:
    for descriptor in _OPEN:
        with contextlib.suppress(OSError):
            os.close(descriptor)
    _OPEN.clear()


os.register_at_fork(after_in_child=_close_in_child)


def open_lock_file(path: str | Path, flags: int = os.O_RDWR | os.O_CREAT) -> int:
    """Open (by default create) the lock file ``path``; close it with :func:`close_lock_file`."""
    descriptor = os.open(path, flags, 0o644)
    _OPEN.add(descriptor)
    return descriptor


def close_lock_file(descriptor: int) -> None:
    """Close a descriptor of :func:`open_lock_file`, releasing its lock."""
    _OPEN.discard(descriptor)
    os.close(descriptor)


def try_lock(descriptor: int, shared: bool = False, tries: int = 1, pause_s: float = 0.05) -> bool:
    """Take the lock without waiting (``tries`` times, ``pause_s`` apart); False if another
    process holds it.

    Raises:
        OSError: the file system has no locks.
    """
    mode = (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB
    for attempt in range(tries):
        try:
            fcntl.flock(descriptor, mode)
            return True
        except OSError as err:
            if err.errno not in _HELD_ELSEWHERE:
                raise
        if attempt < tries - 1:
            time.sleep(pause_s)
    return False


def wait_lock(descriptor: int) -> None:
    """Take the lock, waiting for whoever holds it.

    Raises:
        OSError: the file system has no locks.
    """
    fcntl.flock(descriptor, fcntl.LOCK_EX)


@dataclass(frozen=True)
class HeldLock:
    """What :func:`exclusive_lock` got: the lock file's descriptor (None: running unguarded) and
    whether it had to wait for another process."""

    descriptor: int | None
    waited: bool


@contextlib.contextmanager
def exclusive_lock(
    path: str | Path,
    unguarded: str,
    *,
    when_held: Callable[[int], None] | None = None,
    tries: int = 1,
) -> Iterator[HeldLock]:
    """Hold ``path``'s exclusive lock for the block, waiting for another process that holds it.

    Args:
        unguarded: what goes unprevented if the lock cannot be taken (a lock file that cannot be
            created, a file system without locks); the block then runs with a warning saying so.
        when_held: called with the descriptor when another process holds the lock, before
            waiting; it may raise to refuse instead of waiting.
        tries: non-blocking attempts before another process counts as holding it.
    """
    try:
        descriptor = open_lock_file(path)
    except OSError as err:
        log.warning("cannot lock %s (%s): %s", path, err, unguarded)
        yield HeldLock(None, waited=False)
        return
    try:
        waited, guarded = False, True
        try:
            held_elsewhere = not try_lock(descriptor, tries=tries)
        except OSError as err:
            log.warning("cannot lock %s (%s): %s", path, err, unguarded)
            held_elsewhere, guarded = False, False
        if held_elsewhere:
            if when_held is not None:
                when_held(descriptor)
            try:
                wait_lock(descriptor)
                waited = True
            except OSError as err:
                log.warning("cannot lock %s (%s): %s", path, err, unguarded)
                guarded = False
        yield HeldLock(descriptor if guarded else None, waited)
    finally:
        close_lock_file(descriptor)
