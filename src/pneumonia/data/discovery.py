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
# Images in other formats are skipped with this reason rather than passed over in silence.
OTHER_IMAGE_SUFFIXES = frozenset(
    {".bmp", ".tif", ".tiff", ".webp", ".gif", ".jfif", ".jp2", ".heic", ".dcm", ".dicom"}
)
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
    #: files that repeat another file's path below its class folder and byte size (Kaggle's second
    #: copy), left out
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


def data_root(root: str | Path) -> Path:
    """``root`` as a path, ``~`` expanded.

    Raises:
        DataLayoutError: ``root`` is empty: ``Path("")`` is the working folder, so an empty
            ``PNEUMONIA_DATA`` would train on whatever is there.
    """
    if not str(root).strip():
        raise DataLayoutError(
            "the data root is empty (is PNEUMONIA_DATA set to an empty string?); unset it, set it "
            f"to a folder or pass data.root=<folder>; {EXPECTED_LAYOUT}."
        )
    return Path(root).expanduser()


def discover_images(root: str | Path, require_both_classes: bool = True) -> list[LabelledImage]:
    """The images of :func:`scan_images` (same arguments, same errors), without the report."""
    return scan_images(root, require_both_classes).images


def scan_images(root: str | Path, require_both_classes: bool = True) -> Discovery:
    """List every image below ``root`` whose path contains a ``NORMAL`` or ``PNEUMONIA`` folder.

    A file found twice with the same path below its class folder and the same byte size (Kaggle's
    archive holds a second copy of the dataset under ``chest_xray/chest_xray``) is kept once. The
    root's own name labels its images only when no class folder lies below it
    (``data.root=<...>/NORMAL``); images in no class folder are left out with one warning. The
    result is sorted by path, so it does not depend on the order the file system lists folders
    in. Entries that cannot be images are skipped with one warning (see the module's docstring).

    Raises:
        DataLayoutError: ``root`` is missing, holds no labelled image, or (``require_both_classes``)
            holds none of one class.
    """
    root = data_root(root)
    if not root.is_dir():
        raise DataLayoutError(
            f"data root {root} does not exist or is not a folder. Run `make data` to link the "
            f"bundled copy, set PNEUMONIA_DATA or pass data.root=<folder>; {EXPECTED_LAYOUT}."
        )
    found: list[LabelledImage] = []
    skipped: dict[str, str] = {}
    # (label, path below the class folder, byte size) of every file kept: Kaggle's second copy
    seen: set[tuple[int, tuple[str, ...], int]] = set()
    duplicates = 0
    outside_class_folders: list[Path] = []  # images in no NORMAL/PNEUMONIA folder below the root
    named_by_root: list[LabelledImage] = []  # images labelled only by the root's own name
    root_label = label_of((root.name,))
    for dirpath, filenames in walk_folders(root, skipped):
        below_root = Path(dirpath).relative_to(root).parts
        label = label_of(below_root)
        # data.root=<...>/NORMAL is a folder of NORMAL images, unless the root holds class
        # folders of its own (decided below, once the whole tree was walked).
        by_root = label is None and root_label is not None
        if by_root:
            label = root_label
        if label is None:
            outside_class_folders += image_files(dirpath, filenames, {})
            continue
        below_class = _below_class_folder(below_root)
        for path in image_files(dirpath, filenames, skipped):
            try:
                st = os.stat(path)  # follows links; a dangling or looping one raises
            except OSError as err:
                skipped[str(path)] = stat_error_reason(path, err)
                continue
            if not stat.S_ISREG(st.st_mode):
                skipped[str(path)] = f"{file_kind(st.st_mode)}, not a regular file; never opened"
                continue
            key = (label, (*below_class, path.name), st.st_size)
            if key in seen:
                duplicates += 1
                continue
            seen.add(key)
            image = LabelledImage(path=path, label=label, patient=patient_id(path.name))
            (named_by_root if by_root else found).append(image)
    if named_by_root and found:
        outside_class_folders += [image.path for image in named_by_root]
    else:
        found += named_by_root
    if outside_class_folders:
        log.warning(
            "left out %d image(s) under %s that sit in no NORMAL or PNEUMONIA folder (e.g. %s); "
            "move them into one to use them",
            len(outside_class_folders),
            root,
            ", ".join(str(path) for path in sorted(outside_class_folders)[:3]),
        )
    if duplicates:
        log.info("skipped %d files that repeat another file's path and size", duplicates)
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
    _warn_of_unlikely_patients(found, root)
    return Discovery(
        images=found, skipped=skipped, duplicates=duplicates, without_patient_id=anonymous
    )


# One child with more than this share of the images (and at least the minimum) is more
# likely file names that repeat across children, e.g. folder-per-patient exports all named
# IM-0001-0001.jpeg. In the Kermany set no child holds more than 0.6% of the images.
LARGEST_PATIENT_SHARE = 0.1
LARGEST_PATIENT_MIN_IMAGES = 20


def _warn_of_unlikely_patients(images: list[LabelledImage], root: Path) -> None:
    """Warn when the patient ids read from file names look wrong: one id under both classes, or one
    id holding a large share of the images. Either way the split by patient is not what it says."""
    labels: dict[str, set[int]] = {}
    counts: dict[str, int] = {}
    for image in images:
        labels.setdefault(image.patient, set()).add(image.label)
        counts[image.patient] = counts.get(image.patient, 0) + 1
    both = sorted(patient for patient, seen in labels.items() if len(seen) > 1)
    largest = max(counts, key=counts.__getitem__, default=None)
    crowded = largest is not None and counts[largest] >= max(
        LARGEST_PATIENT_MIN_IMAGES, LARGEST_PATIENT_SHARE * len(images)
    )
    if both or crowded:
        found = (
            f"{len(both)} patient id(s) hold images of both classes (e.g. {', '.join(both[:3])})"
            if both
            else f"patient id {largest} holds {counts[largest]} of the {len(images)} images"
        )
        log.warning(
            "%s under %s. Patient ids are read from file names (person<N>_*, IM-<N>-*); if these "
            "names repeat across children, the split by patient puts all of them on one side: "
            "rename the files so each child's id is in its name, or use data.group_by=image",
            found,
            root,
        )


def _below_class_folder(folders: tuple[str, ...]) -> tuple[str, ...]:
    """The folders below the nearest NORMAL/PNEUMONIA one among ``folders`` (all if none)."""
    for index in range(len(folders) - 1, -1, -1):
        if folders[index].upper() in CLASS_NAMES:
            return folders[index + 1 :]
    return folders


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
    """The visible files with an image suffix among ``filenames``; non-UTF-8 names and images in
    other formats (BMP, TIFF, WebP, DICOM, ...) are added to ``skipped`` with the reason."""
    for name in filenames:
        suffix = Path(name).suffix.lower()
        if is_hidden(name) or suffix not in IMAGE_SUFFIXES:
            if not is_hidden(name) and suffix in OTHER_IMAGE_SUFFIXES and has_utf8_name(name):
                skipped[str(Path(dirpath, name))] = (
                    f"a {suffix} file: only JPEG and PNG are read; convert it to PNG"
                )
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


def image_paths_below(root: Path, skipped: dict[str, str]) -> list[Path]:
    """Every JPEG and PNG file below ``root``, at any depth, sorted by path (:func:`walk_folders`,
    :func:`image_files`); what cannot be listed or read as an image is added to ``skipped``."""
    found = [
        file
        for dirpath, filenames in walk_folders(root, skipped)
        for file in image_files(dirpath, filenames, skipped)
    ]
    return sorted(found, key=str)


def folder_label(path: Path, root: Path | None = None) -> int | None:
    """The class (index into ``CLASS_NAMES``) a NORMAL or PNEUMONIA folder names for the image
    ``path``, else None.

    Only folders the user pointed at count: below ``root`` (a folder given as ``images=``) and the
    root itself (the nearest wins), or else the image's own folder. A folder further up, such as
    a checkout called ``pneumonia``, says nothing about the image.
    """
    folders = (root.name, *path.parent.relative_to(root).parts) if root else (path.parent.name,)
    return label_of(folders)
