"""Finding labelled images under a data root.

Any folder layout works as long as images sit (at any depth) below folders named ``NORMAL`` and
``PNEUMONIA``: Kaggle's ``chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}``, a flat
``{NORMAL,PNEUMONIA}/``, or a copy nested one level deeper. The splits a download ships with are
ignored on purpose: images are pooled and re-split by patient (see :mod:`pneumonia.data.splits`).

One odd entry never stops discovery: a dangling or looping symbolic link, a FIFO, socket, device or
folder named like an image, or an unreadable folder is skipped, named in one warning and listed in
:attr:`Discovery.skipped`. Nothing is opened here (opening a FIFO would block for ever); only
``os.stat`` is called. A folder reached twice through links (a link loop) is walked once. Images
whose file names carry no patient id are kept, counted and named in one warning, since a split by
patient cannot keep them with the child's other images.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pneumonia import CLASS_NAMES
from pneumonia.data.image_io import file_kind, stat_error_reason
from pneumonia.data.patients import parse_patient_id, patient_id

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpeg", ".jpg", ".png"})
EXPECTED_LAYOUT = (
    "expected images below folders named NORMAL and PNEUMONIA, at any depth, e.g. "
    "<root>/train/NORMAL/*.jpeg and <root>/train/PNEUMONIA/*.jpeg (Kaggle's chest_xray layout) "
    "or <root>/NORMAL/*.png and <root>/PNEUMONIA/*.png"
)


class DataLayoutError(FileNotFoundError):
    """The data root is missing or does not hold the NORMAL/PNEUMONIA layout."""


@dataclass(frozen=True)
class LabelledImage:
    """One image file with its label (index into ``CLASS_NAMES``) and patient id."""

    path: Path
    label: int
    patient: str


@dataclass(frozen=True)
class Discovery:
    """What :func:`scan_images` found below a root."""

    images: list[LabelledImage]
    #: path -> why it was skipped (dangling link, link loop, FIFO, unreadable folder, ...)
    skipped: dict[str, str] = field(default_factory=dict)
    #: files that repeat another file's name and byte size (Kaggle's second copy), left out
    duplicates: int = 0
    #: kept images whose file name carries no patient id (each is its own patient)
    without_patient_id: list[Path] = field(default_factory=list)


def is_hidden(name: str) -> bool:
    # macOS archives ship "__MACOSX/" trees and "._name.jpeg" resource forks next to real images.
    return name.startswith(".") or name == "__MACOSX"


def has_utf8_name(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` encodes as UTF-8. Undecodable bytes in a file name come back from the OS as
    surrogates that caches, ``split.csv`` and logs cannot record, so such files are skipped."""
    try:
        os.fspath(path).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def discover_images(root: str | Path, require_both_classes: bool = True) -> list[LabelledImage]:
    """The images of :func:`scan_images` (same arguments, same errors), without the report."""
    return scan_images(root, require_both_classes).images


def scan_images(root: str | Path, require_both_classes: bool = True) -> Discovery:
    """List every image below ``root`` whose path contains a ``NORMAL`` or ``PNEUMONIA`` folder.

    Files with the same name and byte size found twice (Kaggle's archive holds a second copy of the
    dataset under ``chest_xray/chest_xray``) are kept once. The result is sorted by path, so it does
    not depend on the order the file system lists folders in. Entries that cannot be images are
    skipped with one warning (see the module's docstring).

    Raises:
        DataLayoutError: ``root`` is missing, holds no labelled image, or (``require_both_classes``)
            holds none of one class.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataLayoutError(
            f"data root {root} does not exist or is not a folder. Run `make data` to link the "
            f"bundled copy, set PNEUMONIA_DATA or pass data.root=<folder>; {EXPECTED_LAYOUT}."
        )
    found: list[LabelledImage] = []
    skipped: dict[str, str] = {}
    seen: set[tuple[str, int]] = set()
    duplicates = 0
    for dirpath, filenames in walk_folders(root, skipped):
        # The root's own name counts too: data.root=<...>/NORMAL is a folder of NORMAL images.
        label = label_of((root.name, *Path(dirpath).relative_to(root).parts))
        if label is None:
            continue
        for path in image_files(dirpath, filenames, skipped):
            name = path.name
            try:
                st = os.stat(path)  # follows links; a dangling or looping one raises
            except OSError as err:
                skipped[str(path)] = stat_error_reason(path, err)
                continue
            if not stat.S_ISREG(st.st_mode):
                skipped[str(path)] = f"{file_kind(st.st_mode)}, not a regular file; never opened"
                continue
            key = (name, st.st_size)
            if key in seen:
                duplicates += 1
                continue
            seen.add(key)
            found.append(LabelledImage(path=path, label=label, patient=patient_id(name)))
    if duplicates:
        log.info("skipped %d files that repeat another file's name and size", duplicates)
    if skipped:
        log.warning(
            "skipped %d entr%s under %s: %s",
            len(skipped),
            "y" if len(skipped) == 1 else "ies",
            root,
            "; ".join(f"{path} ({why})" for path, why in sorted(skipped.items())),
        )
    counts = [sum(img.label == k for img in found) for k in range(len(CLASS_NAMES))]
    missing = [name for name, n in zip(CLASS_NAMES, counts, strict=True) if n == 0]
    if len(missing) == len(CLASS_NAMES) or (missing and require_both_classes):
        note = f" ({len(skipped)} entries were skipped, see the warning above)" if skipped else ""
        raise DataLayoutError(
            f"no {' or '.join(missing)} images found under {root}{note}; {EXPECTED_LAYOUT}."
        )
    found.sort(key=lambda img: str(img.path))
    anonymous = [img.path for img in found if parse_patient_id(img.path.name) is None]
    if anonymous:
        log.warning(
            "%d of %d images under %s have no patient id in their file name (e.g. %s): each "
            "counts as its own patient, so a split by patient cannot keep it with the same "
            "child's other images; name files like person<N>_*.jpeg or IM-<N>-*.jpeg to group them",
            len(anonymous),
            len(found),
            root,
            ", ".join(path.name for path in anonymous[:3]),
        )
    return Discovery(
        images=found, skipped=skipped, duplicates=duplicates, without_patient_id=anonymous
    )


def walk_folders(root: Path, skipped: dict[str, str]) -> Iterator[tuple[str, list[str]]]:
    """``(folder, file names)`` of every folder below ``root``, each real folder once, sorted.

    Links to folders are followed, but a folder reached again (a link to one of its own parents
    would be walked again and again, each level a new path) is skipped; hidden folders are not
    entered. Folders that cannot be read or stat'ed are added to ``skipped`` with the reason.
    """

    def unreadable_folder(err: OSError) -> None:
        skipped[str(err.filename)] = f"folder not readable ({err.strerror or err})"

    walked: dict[tuple[int, int], str] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True, onerror=unreadable_folder):
        try:
            folder = os.stat(dirpath)
        except OSError as err:
            skipped[dirpath] = stat_error_reason(dirpath, err)
            dirnames[:] = []
            continue
        first = walked.setdefault((folder.st_dev, folder.st_ino), dirpath)
        if first != dirpath:
            skipped[dirpath] = f"a link to the folder {first}, already walked"
            dirnames[:] = []
            continue
        dirnames[:] = sorted(d for d in dirnames if not is_hidden(d))
        yield dirpath, sorted(filenames)


def image_files(dirpath: str, filenames: list[str], skipped: dict[str, str]) -> Iterator[Path]:
    """The visible files with an image suffix among ``filenames``; non-UTF-8 names are skipped."""
    for name in filenames:
        if is_hidden(name) or Path(name).suffix.lower() not in IMAGE_SUFFIXES:
            continue
        path = Path(dirpath, name)
        if not has_utf8_name(path):
            # Undecodable bytes cannot be written to a UTF-8 CSV or log; name it by its repr.
            skipped[repr(str(path))] = "the file name is not valid UTF-8; rename the file"
            continue
        yield path


def looks_like_a_dataset(root: str | Path, depth: int = 3) -> bool:
    """Whether ``root`` is a folder with a ``NORMAL`` or ``PNEUMONIA`` folder at most ``depth`` down.

    Kaggle's layout has them two levels down (``chest_xray/train/NORMAL``); ``/`` or a home folder
    does not, so a checkpoint recording such a root cannot point ``explain.py`` or the shift suite
    anywhere on disk.
    """
    level = [Path(root)]
    for _ in range(depth):
        children = []
        for folder in level:
            try:
                entries = [e for e in os.scandir(folder) if e.is_dir() and not is_hidden(e.name)]
            except OSError:
                continue
            if any(e.name.upper() in CLASS_NAMES for e in entries):
                return True
            children += [Path(e.path) for e in entries[:50]]
        level = children
    return False


def label_of(rel_parts: tuple[str, ...]) -> int | None:
    """Label of a folder from the nearest NORMAL/PNEUMONIA folder among its parts, if any."""
    for part in reversed(rel_parts):
        upper = part.upper()
        if upper in CLASS_NAMES:
            return CLASS_NAMES.index(upper)
    return None
