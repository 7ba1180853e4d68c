"""Which images ``explain.py`` explains: a file, a folder, a split CSV, or a run's test split."""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

from pneumonia import CLASS_NAMES
from pneumonia.data.discovery import IMAGE_SUFFIXES, is_hidden, label_of


@dataclass(frozen=True)
class ImageToExplain:
    """An image file and its true label (index into ``CLASS_NAMES``), ``None`` when unknown."""

    path: Path
    label: int | None


def _from_split_csv(csv_path: Path, data_root: Path, split: str = "test") -> list[ImageToExplain]:
    with csv_path.open(newline="") as f:
        rows = [row for row in csv.DictReader(f) if row["split"] == split]
    if not rows:
        raise ValueError(f"{csv_path} lists no {split!r} images")
    items = []
    for row in rows:
        path = Path(row["path"])
        items.append(
            ImageToExplain(
                path if path.is_absolute() else data_root / path, CLASS_NAMES.index(row["label"])
            )
        )
    return items


def run_folder_of(ckpt_path: Path) -> Path | None:
    """The run folder a checkpoint was written into (``<run>/checkpoints/x.ckpt``), if it is one."""
    run = ckpt_path.resolve().parent.parent
    return run if (run / "split.csv").is_file() else None


def collect_images(
    images: str | Path | None, ckpt_path: Path, data_root: Path
) -> list[ImageToExplain]:
    """Resolve the ``images`` config value.

    ``None``: the test split of the checkpoint's own run (its ``split.csv``); a run folder or a
    ``split.csv``: that test split (paths relative to ``data_root``); an image file; or a folder,
    searched recursively (labels from ``NORMAL``/``PNEUMONIA`` folder names when present).

    Raises:
        FileNotFoundError: nothing to explain at that path, with what was expected.
    """
    if images is None:
        run = run_folder_of(ckpt_path)
        if run is None:
            raise FileNotFoundError(
                f"no images given and {ckpt_path} is not inside a run folder with split.csv; "
                "pass images=<image file, folder, run folder or split.csv>"
            )
        return _from_split_csv(run / "split.csv", data_root)
    path = Path(images).expanduser()
    if path.is_file() and path.suffix.lower() == ".csv":
        return _from_split_csv(path, data_root)
    if path.is_dir() and (path / "split.csv").is_file():
        return _from_split_csv(path / "split.csv", data_root)
    if path.is_file():
        return [ImageToExplain(path, label_of(path.parent.parts))]
    if path.is_dir():
        found = []
        for dirpath, dirnames, filenames in os.walk(path, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not is_hidden(d))
            for name in sorted(filenames):
                if not is_hidden(name) and Path(name).suffix.lower() in IMAGE_SUFFIXES:
                    file = Path(dirpath, name)
                    found.append(ImageToExplain(file, label_of(file.parent.parts)))
        if found:
            return found
        raise FileNotFoundError(f"no .jpeg, .jpg or .png images under {path}")
    raise FileNotFoundError(
        f"images={images}: no such file or folder; pass an image, a folder of images, a run folder "
        "or a split.csv"
    )
