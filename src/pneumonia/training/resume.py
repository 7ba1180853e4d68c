"""Resuming a run: the same model, the same split, and logs that continue where they stopped."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pneumonia.errors import CheckpointError, SplitChangedError
from pneumonia.model.classifier import DEFAULT_NORMALIZATION
from pneumonia.training.checkpoints import read_checkpoint
from pneumonia.training.loggers import continue_logs

# How each split setting is called on the command line.
SPLIT_SETTING_NAMES = {
    "root": "data.root",
    "seed": "data.seed",
    "split_fractions": "data.split_fractions",
    "group_by": "data.group_by",
    "images": "number of images found",
    "file_list_sha256": "digest of the file list",
}


# What a resumed run must keep: changing any of these mid-run makes a model no recipe describes.
RECIPE_KEYS = (
    "net", "image_size", "optimizer", "scheduler", "augmentation", "normalization",
    "label_smoothing", "operating_point",
)  # fmt: skip
# Their values in checkpoints written before they existed (and what an empty group means).
RECIPE_DEFAULTS: dict[str, Any] = {
    "label_smoothing": 0.0,
    "normalization": DEFAULT_NORMALIZATION,
    "operating_point": {
        "_target_": "pneumonia.metrics.operating_point.FixedThreshold",
        "threshold": 0.5,
    },
}


def split_differences(saved: dict[str, Any], settings: dict[str, Any]) -> list[str]:
    """``"<setting>: <old> -> <new>"`` for every split setting that differs."""
    return [
        f"{SPLIT_SETTING_NAMES.get(key, key)}: {saved.get(key)!r} -> {settings.get(key)!r}"
        for key in sorted(saved.keys() | settings.keys())
        if saved.get(key) != settings.get(key)
    ]


@dataclass(frozen=True)
class ResumePoint:
    """Where a resumed run starts: its checkpoint, the hyperparameters, global step and epoch in it."""

    path: Path
    hparams: dict[str, Any]
    global_step: int
    epoch: int

    @classmethod
    def read(cls, path: str | Path) -> ResumePoint:
        """Read a checkpoint safely (see :func:`~pneumonia.training.checkpoints.read_checkpoint`)."""
        checkpoint = read_checkpoint(path)
        return cls(
            Path(path),
            checkpoint["hyper_parameters"],
            int(checkpoint.get("global_step", 0)),
            int(checkpoint.get("epoch", 0)),
        )

    def check_same_model(self, hparams: dict[str, Any]) -> None:
        """Refuse to resume into another architecture, image size, optimizer, scheduler or recipe.

        Lightning restores the optimizer's and scheduler's state from the checkpoint, so new
        settings for them would be recorded in the checkpoint but silently not used.

        Raises:
            CheckpointError: naming both values.
        """
        for key in RECIPE_KEYS:
            saved = self.hparams.get(key) or RECIPE_DEFAULTS.get(key, self.hparams.get(key))
            configured = hparams.get(key) or RECIPE_DEFAULTS.get(key, hparams.get(key))
            if saved != configured:
                raise CheckpointError(
                    f"{self.path} was trained with {key}={saved}, but this run "
                    f"configures {key}={configured}; resume with the overrides of the original "
                    "run (a resume continues that run; start a new one for other settings)"
                )

    def check_same_split(self, settings: dict[str, Any]) -> None:
        """Refuse to resume with data settings that change the train/val/test split.

        Args:
            settings: the resuming run's ``ChestXrayDataModule.split_settings()``.

        Raises:
            SplitChangedError: naming every setting that differs, with its old and new value.
        """
        saved = self.hparams.get("split")
        if not isinstance(saved, dict):
            return  # written before splits were recorded; the run's split.csv still guards it
        changed = split_differences(saved, settings)
        if changed:
            raise SplitChangedError(
                f"{self.path} was trained on another split than this run would make ("
                + "; ".join(changed)
                + "). Resuming would move images between train, val and test: resume with the "
                "original data settings and files, or start a new run"
            )

    def is_in(self, output_dir: str | Path) -> bool:
        """Whether the checkpoint belongs to the run folder ``output_dir`` (a resume in place)."""
        return Path(output_dir).resolve() in self.path.resolve().parents

    def continue_logs(self, loggers: Iterable[Any]) -> None:
        """Tell loggers that can continue a history to drop what was logged after this point."""
        # The checkpoint holds everything logged up to step G-1 (its validation too); the first
        # batch after it logs at step G, which a killed process may have logged.
        continue_logs(loggers, self.global_step - 1)
