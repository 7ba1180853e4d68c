"""Files written whole: a reader (a person, TensorBoard, a sweep's summary, a resume) sees the old
content or the new, never half a file, even when the writer is killed mid-write."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

NAME_MAX = 255  # bytes in a file name on Linux, macOS and Windows file systems


@contextmanager
def written_aside(path: str | Path) -> Iterator[Path]:
    """Yield a hidden side file beside ``path`` to write; rename it over ``path`` when the block
    ends without an error, and remove it otherwise.

    The side file's name holds the process id, so processes writing the same file at once (DDP
    ranks, sweep jobs) never share one: the last rename wins, and each rename is whole. A process
    killed outright (SIGKILL) leaves its hidden side file behind, never a half-written ``path``.
    """
    path = Path(path)
    partial = path.with_name(_side_name(path.name))
    try:
        yield partial
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def _side_name(name: str) -> str:
    """``.<name>.<pid>.partial``, or with a digest of ``name`` where that would be longer than a
    file name may be (255 bytes): any name the target may have, its side file may have too."""
    side = f".{name}.{os.getpid()}.partial"
    if len(side.encode()) <= NAME_MAX:
        return side
    return f".{hashlib.sha1(name.encode()).hexdigest()}.{os.getpid()}.partial"


def write_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through :func:`written_aside`; return ``path``."""
    with written_aside(path) as partial:
        partial.write_text(text, encoding="utf-8")
    return Path(path)
