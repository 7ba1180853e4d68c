"""Resuming a run: the same model, the same split, and logs that continue where they stopped."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pneumonia.errors import CheckpointError, SplitChangedError
from pneumonia.training.checkpoints import read_checkpoint

# How each split setting is called on the command line.
SPLIT_SETTING_NAMES = {
    "root": "data.root",
    "seed": "data.seed",
    "split_fractions": "data.split_fractions",
    "group_by": "data.group_by",
    "images": "number of images found",
    "file_list_sha256": "digest of the file list",
}


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
        """Refuse to resume into another architecture, image size, optimizer or scheduler.

        Lightning restores the optimizer's and scheduler's state from the checkpoint, so new
        settings for them would be recorded in the checkpoint but silently not used.

        Raises:
            CheckpointError: naming both values.
        """
        for key in ("net", "image_size", "optimizer", "scheduler"):
            if self.hparams.get(key) != hparams[key]:
                raise CheckpointError(
                    f"{self.path} was trained with {key}={self.hparams.get(key)}, but this run "
                    f"configures {key}={hparams[key]}; resume with the overrides of the original "
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
        changed = [
            f"{SPLIT_SETTING_NAMES.get(key, key)}: {saved.get(key)!r} -> {settings.get(key)!r}"
            for key in sorted(saved.keys() | settings.keys())
            if saved.get(key) != settings.get(key)
        ]
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
        for logger in loggers:
            continue_after = getattr(logger, "continue_after", None)
            if callable(continue_after):
                continue_after(self.global_step)
