"""Resuming a run: the same model, the same split, and logs that continue where they stopped."""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pneumonia import is_whole_number
from pneumonia.errors import CheckpointError, SplitChangedError
from pneumonia.model.classifier import DEFAULT_NORMALIZATION
from pneumonia.model.registry import OPTIMIZERS, TARGET
from pneumonia.training.checkpoints import is_inside, read_checkpoint
from pneumonia.training.loggers import continue_logs
from pneumonia.training.random_stream import check_recorded_stream
from pneumonia.training.schedulers import same_setting

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


# Lightning's short spellings of a precision (``precision=32`` is ``"32-true"``).
_PRECISIONS = {"32": "32-true", "64": "64-true", "16": "16-mixed", "bf16": "bf16-mixed"}


def step_settings(
    batch_size: Any, precision: Any, accumulate: Any, clip_val: Any, clip_algorithm: Any
) -> dict[str, Any]:
    """How training steps are taken, in one spelling per behaviour: precision ``32`` and
    ``"32-true"`` alike, clipping at 0 or None both off (and then no algorithm), Lightning's
    defaults for None."""
    precision = "32-true" if precision is None else str(precision)
    clipping = clip_val not in (None, 0, 0.0)
    return {
        "data.batch_size": batch_size,
        "trainer.precision": _PRECISIONS.get(precision, precision),
        "trainer.accumulate_grad_batches": 1 if accumulate is None else accumulate,
        "trainer.gradient_clip_val": clip_val if clipping else None,
        "trainer.gradient_clip_algorithm": (clip_algorithm or "norm") if clipping else None,
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
    optimizer_states: Any = field(default=None, repr=False)

    @classmethod
    def read(cls, path: str | Path) -> ResumePoint:
        """Read a checkpoint safely (see :func:`~pneumonia.training.checkpoints.read_checkpoint`)."""
        checkpoint = read_checkpoint(path)
        counters = {key: checkpoint.get(key, 0) for key in ("global_step", "epoch")}
        for key, value in counters.items():
            if not is_whole_number(value) or value < 0:
                raise CheckpointError(
                    f"{path} records {key}={value!r}, not a count; it was not written by train.py"
                )
        check_recorded_stream(checkpoint, str(path))
        return cls(
            Path(path),
            checkpoint["hyper_parameters"],
            int(counters["global_step"]),
            int(counters["epoch"]),
            checkpoint.get("optimizer_states"),
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

    def check_same_training(self, settings: dict[str, Any], max_epochs: int | None) -> None:
        """Refuse to resume taking the steps otherwise (batch size, precision, accumulation,
        clipping), or with fewer epochs than the checkpoint has trained.

        Raises:
            CheckpointError: naming both values (checkpoints from before the record pass).
        """
        saved = self.hparams.get("training")
        for key, value in settings.items() if isinstance(saved, dict) else ():
            if key in saved and not same_setting(saved[key], value):
                raise CheckpointError(
                    f"{self.path} was trained with {key}={saved[key]!r}, but this run configures "
                    f"{key}={value!r}; resume with {key}={saved[key]!r} (a resume continues that "
                    "run; start a new one for other settings)"
                )
        if is_whole_number(max_epochs) and 0 <= max_epochs < self.epoch + 1:
            raise CheckpointError(
                f"{self.path} has trained {self.epoch + 1} epochs, but this run configures "
                f"trainer.max_epochs={max_epochs}: it would train nothing and record the fewer "
                f"epochs; resume with trainer.max_epochs={self.epoch + 1} or more"
            )

    def check_same_class_weights(self, class_weights: Sequence[float] | None) -> None:
        """Refuse to resume with other loss weights (another ``class_weighting``).

        The weights come from the training split and ``class_weighting``; the split is checked on
        its own, so a difference here means the weighting changed: the epochs before the resume
        and after it would have minimised different losses, while the checkpoint names one.

        Raises:
            CheckpointError: naming both sets of weights.
        """
        saved = self.hparams.get("class_weights")
        if saved is None or class_weights is None:
            return  # written before the statistics were recorded, or a run without them
        if not same_setting(list(saved), list(class_weights)):
            raise CheckpointError(
                f"{self.path} was trained with class weights {_rounded(saved)} (NORMAL, "
                f"PNEUMONIA), but this run would weigh the loss {_rounded(class_weights)}; "
                "resume with the original run's class_weighting"
            )

    def check_optimizer_state(
        self,
        parameters: Sequence[torch.Tensor],
        optimizer: dict[str, Any],
        scheduled: bool,
        cycles_momentum: bool = False,
    ) -> None:
        """Refuse optimizer state that does not belong to these parameters and settings.

        Lightning hands the checkpoint's optimizer state to ``optimizer.load_state_dict``, which
        checks only the number of parameters: moments of other shapes fail at the first step with
        a bare size error, non-finite ones turn every weight NaN, and other hyperparameters in
        its ``param_groups`` (a weight decay, betas, or a learning rate when nothing schedules
        it) silently replace the configured ones.

        Args:
            parameters: the model's parameters in ``configure_optimizers``' order.
            optimizer: the run's optimizer config (``_target_`` and arguments).
            scheduled: whether a scheduler sets the learning rate (then ``lr`` is not compared).
            cycles_momentum: whether it also sets the momentum (OneCycleLR, CyclicLR): then SGD's
                ``momentum`` and the first of Adam's ``betas`` are not compared.

        Raises:
            CheckpointError: naming the checkpoint and what does not fit.
        """
        states = self.optimizer_states
        where = f"{self.path}'s optimizer state"
        if not (isinstance(states, list) and len(states) == 1 and isinstance(states[0], dict)):
            raise CheckpointError(
                f"{where} is missing or not one optimizer's; resume from a checkpoints/last.ckpt "
                "that train.py wrote"
            )
        state, groups = states[0].get("state"), states[0].get("param_groups")
        if not isinstance(state, dict) or not isinstance(groups, list):
            raise CheckpointError(f"{where} has no 'state' and 'param_groups'")
        indices = [i for g in groups if isinstance(g, dict) for i in g.get("params", ())]
        if sorted(indices) != list(range(len(parameters))):
            raise CheckpointError(
                f"{where} covers {len(indices)} parameters, but the model has {len(parameters)}"
            )
        for index, values in state.items():
            shape = tuple(parameters[index].shape) if index in range(len(parameters)) else None
            for name, value in values.items() if isinstance(values, dict) else ():
                if isinstance(value, torch.Tensor):
                    _check_moment(f"{where} holds {name} for parameter {index}", name, value, shape)
        ignored = {"_target_", "params", "fused", "foreach"} | ({"lr"} if scheduled else set())
        ignored |= {"momentum"} if cycles_momentum else set()
        for key, configured in {**_defaults(optimizer.get(TARGET)), **optimizer}.items():
            if key in ignored:
                continue
            for group in groups:
                saved, wanted = group.get(key), configured
                if cycles_momentum and key == "betas" and _is_pair(saved) and _is_pair(wanted):
                    saved, wanted = saved[1], wanted[1]  # beta1 is the cycled momentum
                if key in group and not same_setting(saved, wanted):
                    raise CheckpointError(
                        f"{where} has {key}={group[key]!r}, but the run configures "
                        f"optimizer.{key}={configured!r}; a resume would silently train with the "
                        "checkpoint's value"
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
        return is_inside(self.path, output_dir)

    def continue_logs(self, loggers: Iterable[Any]) -> None:
        """Tell loggers that can continue a history to drop what was logged after this point."""
        # The checkpoint holds everything logged up to step G-1 (its validation too); the first
        # batch after it logs at step G, which a killed process may have logged.
        continue_logs(loggers, self.global_step - 1)


def _check_moment(what: str, name: str, value: torch.Tensor, shape: tuple | None) -> None:
    """One tensor of an optimizer's per-parameter state: real, of the parameter's shape (checked
    before any value is read), finite, and never negative where no step makes it so."""
    if value.is_complex() or value.layout != torch.strided:
        raise CheckpointError(f"{what}: a {value.dtype} {value.layout} tensor, not real values")
    if not value.is_floating_point():
        return
    if value.dim() > 0 and tuple(value.shape) != shape:
        raise CheckpointError(
            f"{what} of shape {tuple(value.shape)}, but the parameter's is {shape}"
        )
    if not bool(torch.isfinite(value).all()):
        raise CheckpointError(
            f"{what}: NaN or infinite values; resuming would turn the weights NaN at the first step"
        )
    # Second moments and step counts are never negative: Adam takes the root of the former.
    if (name == "step" or name.endswith("_sq")) and bool((value < 0).any()):
        raise CheckpointError(f"{what}: negative values, which no optimizer step produces")


def _rounded(weights: Sequence[float]) -> list[float]:
    return [round(float(w), 4) for w in weights]


def _defaults(target: Any) -> dict[str, Any]:
    """The keyword defaults of a registered optimizer class (what an unconfigured key means)."""
    cls = OPTIMIZERS.get(target) if isinstance(target, str) else None
    if cls is None:
        return {}
    return {
        name: p.default
        for name, p in inspect.signature(cls).parameters.items()
        if p.default is not inspect.Parameter.empty
    }


def _is_pair(value: Any) -> bool:
    return isinstance(value, list | tuple) and len(value) == 2
