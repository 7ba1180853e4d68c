"""The data a checkpoint was trained on, rebuilt from the split it records.

A checkpoint records its data root, split seed, fractions and grouping. Evaluating it on "the test
split it was trained with" rebuilds that split and refuses when the files below the root changed
since (:class:`~pneumonia.errors.SplitChangedError`); evaluating it on another folder looks for
its training and validation images among the evaluated ones, pixel for pixel.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig

from pneumonia.data.datamodule import ChestXrayDataModule
from pneumonia.data.discovery import looks_like_a_dataset
from pneumonia.errors import CheckpointError, SplitChangedError
from pneumonia.training.resume import split_differences

log = logging.getLogger(__name__)


def training_pool(
    cfg: DictConfig, hparams: dict[str, Any], ckpt_path: Path, image_size: int
) -> ChestXrayDataModule | None:
    """The data a checkpoint was trained on, split as it was, to look for its training images
    among those it is evaluated on; None (the reason logged) where it cannot be rebuilt here."""
    try:
        pool = checkpoint_data(
            cfg,
            hparams,
            ckpt_path,
            None,
            image_size=image_size,
            split_csv=None,
            external_tests=None,
        )
        pool.setup("test")
    except (ValueError, OSError) as reason:  # a check that cannot be made must not stop the eval
        log.warning(
            "not checked for images %s was trained or validated on (n/a in test_metrics.json): %s",
            ckpt_path,
            reason,
        )
        return None
    return pool


def copies_of_training_images(
    pool: ChestXrayDataModule | None, evaluated: ChestXrayDataModule
) -> int | None:
    """How many evaluated images are, pixel for pixel, ones the checkpoint was trained or
    validated on (warned of); None without its training pool."""
    if pool is None:
        return None
    if evaluated.splits is None:  # ddp_spawn set it up in its workers only
        evaluated.setup("test")
    copies = pool.copies_in_pool(evaluated, splits=("train", "val"))
    if copies:
        log.warning(
            "%d of the %d evaluated images were in the training or validation split of the "
            "checkpoint (pixel for pixel at %d px, e.g. %s = %s): its figures here overstate how it "
            "does on X-rays it has not seen. Evaluate on its test split (python train.py fit=false "
            "ckpt_path=<run>) or on other X-rays",
            len(copies),
            int((evaluated.splits == "test").sum()),
            evaluated.image_size,
            *copies[0],
        )
    return len(copies)


def checkpoint_data(
    cfg: DictConfig, hparams: dict[str, Any], ckpt_path: Path, root: str | None, **settings: Any
) -> ChestXrayDataModule:
    """``cfg.data`` (with ``settings``) split as the checkpoint was trained, not yet set up.

    ``root``: where that data lies now (None: where the checkpoint says). Compared before anything
    is decoded: a wrong root is refused after a walk of its folders.

    Raises:
        CheckpointError: the checkpoint records no usable split, or its root holds no dataset.
        SplitChangedError: the files below the root changed since.
    """
    datamodule: ChestXrayDataModule = instantiate(
        cfg.data, **settings, **checkpoint_split_settings(hparams, ckpt_path, root)
    )
    saved = {**hparams["split"], "root": str(datamodule.root)}
    _check_rebuilt_split(saved, datamodule.split_settings(), ckpt_path)
    return datamodule


def checkpoint_split_settings(
    hparams: dict[str, Any], ckpt_path: Path, root: str | None
) -> dict[str, Any]:
    """The data settings that rebuild the split a checkpoint was trained on.

    ``root``: where the data lies now (``data.root``); ``None``: where the checkpoint says it was
    trained, if that folder looks like a dataset. The files below it must be the same ones.
    """
    split = hparams.get("split")
    if not isinstance(split, dict):
        raise CheckpointError(
            f"{ckpt_path} records no split (it predates split records), so its test split cannot "
            "be rebuilt; evaluate it on a folder instead: --config-name eval data.root=<folder>"
        )
    fractions = split.get("split_fractions")
    valid = (
        isinstance(split.get("root"), str)
        and isinstance(split.get("seed"), int)
        and split.get("group_by") in ("patient", "image")
        and isinstance(fractions, list)
        and len(fractions) == 3
        and all(isinstance(f, int | float) and not isinstance(f, bool) for f in fractions)
    )
    if not valid:
        raise CheckpointError(f"{ckpt_path} records a malformed split: {split!r}")
    if root is None:
        root = split["root"]
        if not looks_like_a_dataset(Path(root)):
            raise CheckpointError(
                f"{ckpt_path} was trained on {root}, which holds no NORMAL or PNEUMONIA folder "
                "now; pass data.root=<the folder the data lies in now>"
            )
    return {
        "root": root,
        "seed": split["seed"],
        "split_fractions": fractions,
        "group_by": split["group_by"],
        "require_both_classes": True,
    }


def _check_rebuilt_split(saved: dict[str, Any], rebuilt: dict[str, Any], ckpt_path: Path) -> None:
    changed = split_differences(saved, rebuilt)
    if changed:
        raise SplitChangedError(
            f"the test split of {ckpt_path} cannot be rebuilt: its data changed ("
            + "; ".join(changed)
            + "). Restore the files it was trained on, or evaluate on a folder: "
            "--config-name eval data.root=<folder>"
        )
