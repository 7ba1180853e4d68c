"""Which images ``explain.py`` explains: a file, a folder, a split CSV, or a run's test split."""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path

from pneumonia import CLASS_NAMES
from pneumonia.data.discovery import IMAGE_SUFFIXES, folder_label, image_paths_below, label_of

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageToExplain:
    """An image file and its true label (index into ``CLASS_NAMES``), ``None`` when unknown."""

    path: Path
    label: int | None


def _from_split_csv(
    csv_path: Path, data_root: Path, refused: dict[str, str], split: str = "test"
) -> list[ImageToExplain]:
    with csv_path.open(newline="") as f:
        rows = [row for row in csv.DictReader(f) if row.get("split") == split]
    if not rows:
        raise ValueError(f"{csv_path} lists no {split!r} images")
    items = []
    for row in rows:
        path, why = _inside(data_root, row.get("path") or "")
        if why is None and row.get("label") not in CLASS_NAMES:
            why = f"label {row.get('label')!r} is not one of {list(CLASS_NAMES)}"
        if why is None and path.suffix.lower() not in IMAGE_SUFFIXES:
            why = f"not a {'/'.join(sorted(IMAGE_SUFFIXES))} image"
        if why is None and label_of(path.relative_to(data_root).parent.parts) != CLASS_NAMES.index(
            row["label"]
        ):
            # A split file lists images below their class's folder; anything else is not ours.
            why = f"the path does not lie below a {row['label']} folder"
        if why is not None:
            refused[str(row.get("path"))] = why
            log.error(
                "%s: refusing image %r: %s; explaining the others", csv_path, row["path"], why
            )
            continue
        items.append(ImageToExplain(path, CLASS_NAMES.index(row["label"])))
    if not items:
        raise ValueError(f"{csv_path}: every {split!r} image was refused: {refused}")
    return items


def _inside(data_root: Path, relative: str) -> tuple[Path, str | None]:
    """``data_root / relative``, or why not: a split file may only name images below its data root.

    The check is on the path as written (``..`` and absolute paths), not on resolved symlinks: a
    data root may itself link to the images, as ``make data`` does.
    """
    path = Path(relative)
    if not relative or path.is_absolute() or path.drive:
        return path, f"the path must be relative to the data root {data_root}"
    if ".." in path.parts:
        return path, f"the path leaves the data root {data_root}"
    return data_root / path, None


def run_folder_of(ckpt_path: Path) -> Path | None:
    """The run folder a checkpoint was written into (``<run>/checkpoints/x.ckpt``), if it is one."""
    run = ckpt_path.resolve().parent.parent
    return run if (run / "split.csv").is_file() else None


def collect_images(
    images: str | Path | None,
    ckpt_path: Path,
    data_root: Path,
    refused: dict[str, str] | None = None,
) -> list[ImageToExplain]:
    """Resolve the ``images`` config value.

    ``None``: the test split of the checkpoint's own run (its ``split.csv``); a run folder or a
    ``split.csv``: that test split (paths relative to ``data_root``); an image file; or a folder,
    searched recursively (labels from ``NORMAL``/``PNEUMONIA`` folder names when present).

    A split file's rows are refused, logged, skipped and recorded in ``refused`` (path -> reason)
    when they leave ``data_root`` (absolute paths, ``..``), carry an unknown label, are not image
    files, or do not lie below a folder named after their label (as every image a split lists
    does): a checkpoint's recorded data root and a run's ``split.csv`` are data from others.

    Raises:
        FileNotFoundError: nothing to explain at that path, with what was expected.
    """
    refused = {} if refused is None else refused
    if images is None:
        run = run_folder_of(ckpt_path)
        if run is None:
            raise FileNotFoundError(
                f"no images given and {ckpt_path} is not inside a run folder with split.csv; "
                "pass images=<image file, folder, run folder or split.csv>"
            )
        return _from_split_csv(run / "split.csv", data_root, refused)
    path = Path(images).expanduser()
    if path.is_file() and path.suffix.lower() == ".csv":
        return _from_split_csv(path, data_root, refused)
    if path.is_dir() and (path / "split.csv").is_file():
        return _from_split_csv(path / "split.csv", data_root, refused)
    if path.is_file():
        return [ImageToExplain(path, folder_label(path))]
    if path.is_dir():
        skipped: dict[str, str] = {}
        found = [
            ImageToExplain(file, folder_label(file, path))
            for file in image_paths_below(path, skipped)
        ]
        for entry, why in skipped.items():
            log.error("skipping %s: %s", entry, why)
        refused.update(skipped)
        if found:
            return found
        raise FileNotFoundError(f"no .jpeg, .jpg or .png images under {path}")
    raise FileNotFoundError(
        f"images={images}: no such file or folder; pass an image, a folder of images, a run folder "
        "or a split.csv"
    )
