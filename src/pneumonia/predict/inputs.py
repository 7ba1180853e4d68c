"""Which images ``predict.py`` scores: one image file, every image below a folder, or a ``.txt`` list.

Nothing is opened here but folders and the list file: each image is decoded (or refused) later by
:func:`pneumonia.data.image_io.load_grayscale`, which never blocks on a FIFO and names why a file is
unusable. Entries that cannot even be listed (a file name that is not valid UTF-8, a folder that
cannot be read, a link back to a folder already walked) are returned as ``skipped`` so they end up
in ``unreadable.csv`` with the other refused files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from pneumonia import CLASS_NAMES
from pneumonia.data.discovery import folder_label, has_utf8_name, image_paths_below

#: A file with this suffix is a list of image paths, one a line, not an image.
LIST_SUFFIX = ".txt"
WHAT_TO_PASS = (
    "pass images=<an image file>, images=<a folder of .jpeg/.jpg/.png images, searched "
    "recursively> or images=<a .txt file listing image paths, one a line>"
)


@dataclass(frozen=True)
class InputImage:
    """An image to score and its true class when its path says so (a NORMAL or PNEUMONIA folder)."""

    path: Path
    label: str | None = None


@dataclass(frozen=True)
class Inputs:
    """What :func:`collect_inputs` found: images in the order they are scored, and what it skipped."""

    images: list[InputImage]
    #: path (``repr`` of it when the name is not UTF-8) -> why it was skipped
    skipped: dict[str, str] = field(default_factory=dict)


def path_label(path: Path, root: Path | None = None) -> str | None:
    """``NORMAL`` or ``PNEUMONIA`` when a folder names the image's class (see
    :func:`~pneumonia.data.discovery.folder_label`), else None."""
    index = folder_label(path, root)
    return None if index is None else CLASS_NAMES[index]


def collect_inputs(images: str | os.PathLike[str]) -> Inputs:
    """Resolve the ``images`` config value.

    - an image file: that image (any file that is not a ``.txt`` list is tried as an image);
    - a folder: every ``.jpeg``/``.jpg``/``.png`` file below it, at any depth, sorted by path
      (links are followed, each real folder walked once; hidden files and ``__MACOSX`` skipped);
    - a ``.txt`` file: the paths it lists, one a line, in its order; blank lines and lines
      starting with ``#`` are ignored, and relative paths are relative to the list's folder.

    Raises:
        FileNotFoundError: the path does not exist, the folder holds no image or the list no path;
            the message names the path and what to pass.
        ValueError: the list is not UTF-8 text.
    """
    path = Path(images).expanduser()
    if not has_utf8_name(path):
        raise FileNotFoundError(f"images={path!r}: the path is not valid UTF-8; {WHAT_TO_PASS}")
    if path.is_dir():
        return _walk(path)
    if path.is_file() and path.suffix.lower() == LIST_SUFFIX:
        return _read_list(path)
    if path.exists() or path.is_symlink():
        # An image, or something load_grayscale refuses with its reason (a FIFO, a dangling link).
        return Inputs([InputImage(path, path_label(path))])
    raise FileNotFoundError(f"images={path}: no such file or folder; {WHAT_TO_PASS}")


def _walk(root: Path) -> Inputs:
    found: list[InputImage] = []
    skipped: dict[str, str] = {}
    found = [InputImage(file, path_label(file, root)) for file in image_paths_below(root, skipped)]
    if not found:
        note = f" ({len(skipped)} entries skipped: {skipped})" if skipped else ""
        raise FileNotFoundError(
            f"images={root}: no .jpeg, .jpg or .png images below this folder{note}; {WHAT_TO_PASS}"
        )
    return Inputs(found, skipped)


def _read_list(list_file: Path) -> Inputs:
    try:
        lines = list_file.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as err:
        raise ValueError(
            f"images={list_file}: the list is not UTF-8 text ({err}); {WHAT_TO_PASS}"
        ) from err
    found = []
    for line in lines:
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        path = Path(entry).expanduser()
        if not path.is_absolute():
            path = list_file.parent / path
        found.append(InputImage(path, path_label(path)))
    if not found:
        raise FileNotFoundError(f"images={list_file}: the list names no image path; {WHAT_TO_PASS}")
    return Inputs(found)
