"""Finding labelled images under a data root.

Any folder layout works as long as images sit (at any depth) below folders named ``NORMAL`` and
``PNEUMONIA``: Kaggle's ``chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}``, a flat
``{NORMAL,PNEUMONIA}/``, or a copy nested one level deeper. The splits a download ships with are
ignored on purpose: images are pooled and re-split by patient (see :mod:`pneumonia.data.splits`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from pneumonia import CLASS_NAMES
from pneumonia.data.patients import patient_id

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


def is_hidden(name: str) -> bool:
    # macOS archives ship "__MACOSX/" trees and "._name.jpeg" resource forks next to real images.
    return name.startswith(".") or name == "__MACOSX"


def discover_images(root: str | Path, require_both_classes: bool = True) -> list[LabelledImage]:
    """List every image below ``root`` whose path contains a ``NORMAL`` or ``PNEUMONIA`` folder.

    Files with the same name and byte size found twice (Kaggle's archive holds a second copy of the
    dataset under ``chest_xray/chest_xray``) are kept once. The result is sorted by path, so it does
    not depend on the order the file system lists folders in.

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
    seen: set[tuple[str, int]] = set()
    duplicates = 0
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not is_hidden(d))
        # The root's own name counts too: data.root=<...>/NORMAL is a folder of NORMAL images.
        label = label_of((root.name, *Path(dirpath).relative_to(root).parts))
        if label is None:
            continue
        for name in sorted(filenames):
            if is_hidden(name) or Path(name).suffix.lower() not in IMAGE_SUFFIXES:
                continue
            path = Path(dirpath, name)
            key = (name, path.stat().st_size)
            if key in seen:
                duplicates += 1
                continue
            seen.add(key)
            found.append(LabelledImage(path=path, label=label, patient=patient_id(name)))
    if duplicates:
        log.info("skipped %d files that repeat another file's name and size", duplicates)
    counts = [sum(img.label == k for img in found) for k in range(len(CLASS_NAMES))]
    missing = [name for name, n in zip(CLASS_NAMES, counts, strict=True) if n == 0]
    if len(missing) == len(CLASS_NAMES) or (missing and require_both_classes):
        raise DataLayoutError(
            f"no {' or '.join(missing)} images found under {root}; {EXPECTED_LAYOUT}."
        )
    found.sort(key=lambda img: str(img.path))
    return found


def label_of(rel_parts: tuple[str, ...]) -> int | None:
    """Label of a folder from the nearest NORMAL/PNEUMONIA folder among its parts, if any."""
    for part in reversed(rel_parts):
        upper = part.upper()
        if upper in CLASS_NAMES:
            return CLASS_NAMES.index(upper)
    return None
