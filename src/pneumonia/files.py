"""Files written whole: a reader (a person, TensorBoard, a sweep's summary, a resume) sees the old
content or the new, never half a file, even when the writer is killed mid-write."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def written_aside(path: str | Path) -> Iterator[Path]:
    """Yield a hidden side file beside ``path`` to write; rename it over ``path`` when the block
    ends without an error, and remove it otherwise.

    The side file's name holds the process id, so processes writing the same file at once (DDP
    ranks, sweep jobs) never share one: the last rename wins, and each rename is whole. A process
    killed outright (SIGKILL) leaves its hidden side file behind, never a half-written ``path``.
    """
    path = Path(path)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        yield partial
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def write_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through :func:`written_aside`; return ``path``."""
    with written_aside(path) as partial:
        partial.write_text(text, encoding="utf-8")
    return Path(path)
