"""Files written whole: a reader (a person, TensorBoard, a sweep's summary, a resume) sees the old
content or the new, never half a file, even when the writer is killed mid-write."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

NAME_MAX = 255  # bytes in a file name on Linux, macOS and Windows file systems
_SIDE_FILE = re.compile(r"(?P<stem>\..+)\.(?P<pid>[0-9]+)\.partial", re.DOTALL)


@contextmanager
def written_aside(path: str | Path) -> Iterator[Path]:
    """Yield a hidden side file beside ``path`` to write; rename it over ``path`` when the block
    ends without an error, and remove it otherwise.

    The side file's name holds the process id, so processes writing the same file at once (DDP
    ranks, sweep jobs) never share one: the last rename wins, and each rename is whole. A process
    killed outright (SIGKILL) leaves its hidden side file behind, never a half-written ``path``;
    :func:`remove_stale_side_files` clears such leftovers.
    """
    path = Path(path)
    partial = path.with_name(_side_name(path.name))
    try:
        yield partial
        with contextlib.suppress(OSError):  # a new file keeps the umask's permissions
            shutil.copymode(path, partial)  # a user's chmod of the old file survives the rewrite
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def _side_name(name: str) -> str:
    """``.<name>.<pid>.partial``, or with a digest of ``name`` where that would be longer than a
    file name may be (255 bytes): any name the target may have, its side file may have too."""
    plain, digest = _side_stems(name)
    side = f"{plain}.{os.getpid()}.partial"
    return side if len(side.encode()) <= NAME_MAX else f"{digest}.{os.getpid()}.partial"


def _side_stems(name: str) -> tuple[str, str]:
    """The two stems a side file of ``name`` may have: ``.<name>`` and ``.<digest of name>``."""
    return f".{name}", f".{hashlib.sha1(name.encode()).hexdigest()}"


def write_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through :func:`written_aside`; return ``path``."""
    with written_aside(path) as partial:
        partial.write_text(text, encoding="utf-8")
    return Path(path)


def save_figure(figure: Any, path: str | Path, **savefig_kwargs: Any) -> Path:
    """Save a matplotlib ``figure`` as ``path`` (its format from the suffix) through
    :func:`written_aside`; return ``path``."""
    path = Path(path)
    with written_aside(path) as partial:
        figure.savefig(partial, format=path.suffix.lstrip("."), **savefig_kwargs)
    return path


def is_side_file(name: str) -> bool:
    """Whether ``name`` is that of a side file of :func:`written_aside` (``.<name>.<pid>.partial``)."""
    return _SIDE_FILE.fullmatch(name) is not None


def remove_stale_side_files(folder: str | Path, target: str | None = None) -> list[Path]:
    """Remove the side files of :func:`written_aside` that processes killed outright left in
    ``folder`` and the folders in it (only those of the file named ``target`` in ``folder``, if
    given).

    A side file is stale when no process has the id its name holds: a live writer's, on this
    machine, is never touched. Call it where no other machine writes into ``folder`` (a process
    id means nothing there), as a run does in the folder it holds the lock of.

    Returns:
        The paths removed.
    """
    folder = Path(folder)
    entries = _entries(folder)
    if target is None:  # and the folders in it, where runs write (not a tree a user named)
        subfolders = [entry.path for entry in entries if _is(entry.is_dir, follow_symlinks=False)]
        entries += [entry for sub in subfolders for entry in _entries(Path(sub))]
    # Either stem its writer may have used (the digest one beside a long name).
    stems = set(_side_stems(target)) if target is not None else None
    removed = []
    for entry in entries:
        match = _SIDE_FILE.fullmatch(entry.name)
        if match is None or (stems is not None and match["stem"] not in stems):
            continue
        if _process_exists(int(match["pid"])):
            continue
        if not _is(entry.is_file, follow_symlinks=False) and not entry.is_symlink():
            continue  # a folder, FIFO or socket of that name is no side file
        try:
            os.unlink(entry.path)
        except OSError as problem:  # a leftover is not worth stopping for
            log.warning(
                "could not remove %s, a file a killed process left: %s", entry.path, problem
            )
            continue
        removed.append(Path(entry.path))
    if removed:
        log.info("removed %d unfinished file(s) of killed processes in %s", len(removed), folder)
    return removed


def _entries(folder: Path) -> list[os.DirEntry]:
    """The entries of ``folder``; none where it cannot be read (a leftover is not worth stopping for)."""
    try:
        with os.scandir(folder) as entries:
            return list(entries)
    except OSError:
        return []


def _is(test: Callable[..., bool], **kwargs: Any) -> bool:
    try:
        return bool(test(**kwargs))
    except OSError:  # a permission denied on one entry
        return False


def _process_exists(pid: int) -> bool:
    if pid <= 0 or pid == os.getpid():
        return True  # 0 would signal our own process group; our own pid may be writing
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # OverflowError: no process id is that large
        return False
    except PermissionError:  # another user's live process
        return True
    return True
