"""Deterministic train/val/test splits, stratified by class and grouped by patient.

Kermany's data has several images of many children. Splitting by image (as the study did) puts
the same child in training and test and inflates test scores, so the default groups by patient:
every image of a patient lands in the same split. ``group_by="image"`` reproduces the study.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pneumonia.errors import SplitChangedError
from pneumonia.files import written_aside

SPLITS: tuple[str, str, str] = ("train", "val", "test")
GROUPINGS = ("patient", "image")


def check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    """Validate (train, val, test) fractions: three non-negative numbers that add up to 1."""
    values = tuple(float(f) for f in fractions)
    # `not f >= 0` also catches NaN, which every comparison calls false.
    if len(values) != 3 or any(not f >= 0 for f in values) or not abs(sum(values) - 1.0) <= 1e-6:
        raise ValueError(
            f"split fractions {list(fractions)} must be three non-negative numbers "
            "(train, val, test) that add up to 1, e.g. [0.8, 0.1, 0.1]"
        )
    return values  # type: ignore[return-value]


def assign_splits(
    labels: Sequence[int],
    groups: Sequence[str],
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 42,
) -> np.ndarray:
    """Assign every image to ``"train"``, ``"val"`` or ``"test"``.

    Groups (patients) are shuffled per class with ``seed`` and dealt out in order until each split
    holds its fraction of that class's images, so class ratios match across splits and no group is
    divided. A group whose images carry both labels is filed under its majority label.

    Args:
        labels: ``(N,)`` class index per image.
        groups: ``(N,)`` group id per image; pass unique ids (e.g. file paths) to split per image.
        fractions: (train, val, test), adding up to 1.
        seed: the same seed, labels and groups always give the same split.

    Returns:
        ``(N,)`` array of split names.
    """
    fractions = check_fractions(fractions)
    labels = np.asarray(labels)
    groups = np.asarray(groups)
    if labels.shape != groups.shape:
        raise ValueError(f"labels {labels.shape} and groups {groups.shape} differ in length")
    names, inverse, sizes = np.unique(groups, return_inverse=True, return_counts=True)
    positives = np.bincount(inverse, weights=labels, minlength=len(names))
    group_label = (positives * 2 > sizes).astype(int)
    bounds = np.cumsum(fractions)
    group_split = np.empty(len(names), dtype=object)
    rng = np.random.default_rng(seed)
    for label in np.unique(group_label):
        members = np.flatnonzero(group_label == label)  # sorted by group name: order-independent
        members = members[rng.permutation(len(members))]
        counts = sizes[members]
        # Position of each group's middle image within its class decides the split it falls in.
        middle = (np.cumsum(counts) - counts / 2) / counts.sum()
        which = np.minimum(np.searchsorted(bounds, middle, side="right"), len(SPLITS) - 1)
        group_split[members] = np.asarray(SPLITS, dtype=object)[which]
    return group_split[inverse].astype(str)


def write_split_csv(
    path: str | Path,
    image_paths: Sequence[str | Path],
    labels: Sequence[int],
    patients: Sequence[str],
    splits: Sequence[str],
    class_names: Sequence[str],
) -> None:
    """Write one row per image (path, label, patient, split) so a split can be audited or reused.

    A run's split is part of its result: an existing file is never rewritten with other rows.

    Raises:
        SplitChangedError: ``path`` exists and lists another split; names the rows that differ.
    """
    path = Path(path)
    header = ["path", "label", "patient", "split"]
    rows = [
        [str(image_path), class_names[int(label)], patient, split]
        for image_path, label, patient, split in zip(
            image_paths, labels, patients, splits, strict=True
        )
    ]
    if path.exists():
        _refuse_another_split(path, header, rows)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    # Under DDP every process may write the same split at once: each writes whole.
    with written_aside(path) as partial, partial.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def _refuse_another_split(path: Path, header: list[str], rows: list[list[str]]) -> None:
    with path.open(newline="") as f:
        existing = list(csv.reader(f))
    if existing == [header, *rows]:
        return
    before = {row[0]: row for row in existing[1:] if row}
    after = {row[0]: row for row in rows}
    added = sorted(after.keys() - before.keys())
    removed = sorted(before.keys() - after.keys())
    moved = sorted(p for p in after.keys() & before.keys() if after[p] != before[p])
    details = [f"{len(added)} image(s) added", f"{len(removed)} removed", f"{len(moved)} changed"]
    examples = [f"+{p}" for p in added[:2]] + [f"-{p}" for p in removed[:2]]
    examples += [f"{p}: {before[p][3]} -> {after[p][3]}" for p in moved[:3]]
    raise SplitChangedError(
        f"{path} holds this run's split, and the current data settings would change it "
        f"({', '.join(details)}; e.g. {'; '.join(examples) or 'row order'}). A run's split is "
        "never rewritten: resume with the run's own data settings (data.root, data.seed, "
        "data.split_fractions, data.group_by) and files, or start a new run folder"
    )
