"""Learning-rate schedules over a whole run that torch has no plain-argument class for.

torch builds warm-up followed by cosine decay from ``SequentialLR`` and other scheduler objects,
which a config or a checkpoint cannot hold as data (see :mod:`pneumonia.model.registry`), so it
is one class here. Its ``total_steps`` (like ``OneCycleLR``'s) may be left ``null`` in a config:
``XrayClassifier.configure_optimizers`` fills in the run's optimiser steps.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch.optim.lr_scheduler import LRScheduler

from pneumonia import is_whole_number
from pneumonia.model.registry import register


@register("scheduler")
class WarmupCosine(LRScheduler):
    """Linear warm-up from ``start_factor * lr`` to ``lr``, then cosine decay to ``min_factor * lr``.

    Step it once per optimiser step (``interval: step``).

    Args:
        optimizer: the wrapped optimiser; its ``lr`` is the peak.
        total_steps: optimiser steps of the whole run (at least 1).
        warmup_fraction: share of ``total_steps`` spent warming up, in [0, 1).
        start_factor: learning rate at step 0 as a fraction of the peak, in (0, 1].
        min_factor: final learning rate as a fraction of the peak, in [0, 1].
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        total_steps: int,
        warmup_fraction: float = 0.05,
        start_factor: float = 0.1,
        min_factor: float = 0.0,
        last_epoch: int = -1,
    ) -> None:
        if not is_whole_number(total_steps) or total_steps < 1:
            raise ValueError(f"WarmupCosine total_steps={total_steps!r} must be an integer >= 1")
        if not 0.0 <= warmup_fraction < 1.0:
            raise ValueError(f"WarmupCosine warmup_fraction={warmup_fraction} must be in [0, 1)")
        if not 0.0 < start_factor <= 1.0:
            raise ValueError(f"WarmupCosine start_factor={start_factor} must be in (0, 1]")
        if not 0.0 <= min_factor <= 1.0:
            raise ValueError(f"WarmupCosine min_factor={min_factor} must be in [0, 1]")
        self.total_steps = total_steps
        self.warmup_steps = round(warmup_fraction * total_steps)
        self.start_factor = start_factor
        self.min_factor = min_factor
        super().__init__(optimizer, last_epoch)

    def factor(self, step: int) -> float:
        """The learning rate at optimiser step ``step`` as a fraction of the peak."""
        if step < self.warmup_steps:
            return self.start_factor + (1 - self.start_factor) * step / self.warmup_steps
        decay_steps = max(self.total_steps - self.warmup_steps, 1)
        progress = min((step - self.warmup_steps) / decay_steps, 1.0)
        return self.min_factor + (1 - self.min_factor) * 0.5 * (1 + math.cos(math.pi * progress))

    def get_lr(self) -> list[float]:
        factor = self.factor(self.last_epoch)
        return [base_lr * factor for base_lr in self.base_lrs]


# What a scheduler's state holds about its progress; everything else follows from its config.
_PROGRESS = frozenset(
    {"last_epoch", "_step_count", "_last_lr", "_get_lr_called_within_step", "_is_initial",
     "T_cur", "T_i", "verbose"}
)  # fmt: skip
# What schedulers keep in the optimizer's param_groups (OneCycleLR's peak and floor, ...).
_GROUP_KEYS = ("initial_lr", "max_lr", "min_lr", "base_momentum", "max_momentum")


def cycles_momentum(scheduler: Mapping[str, Any] | None) -> bool:
    """Whether a scheduler config moves the momentum with the learning rate (OneCycleLR and
    CyclicLR unless ``cycle_momentum=False``): SGD's ``momentum``, Adam's first beta."""
    scheduler = scheduler or {}
    cycling = str(scheduler.get("_target_", "")).endswith(("OneCycleLR", "CyclicLR"))
    return cycling and scheduler.get("cycle_momentum", True) is not False


def schedule_settings(optimizer: torch.optim.Optimizer, scheduler: Any) -> dict[str, Any]:
    """What a schedule is, apart from how far it got: to compare a restored one with its config."""
    state = {k: v for k, v in scheduler.state_dict().items() if k not in _PROGRESS}
    groups = [{k: g[k] for k in _GROUP_KEYS if k in g} for g in optimizer.param_groups]
    return copy.deepcopy({"scheduler": state, "param_groups": groups})


def schedule_differences(configured: dict[str, Any], restored: dict[str, Any]) -> list[str]:
    """``"<key>: <configured> -> <restored>"`` for every setting that differs: the scheduler's
    state first, then the param_groups' keys (``param_groups[0].max_lr``)."""
    mine, theirs = _flat_settings(configured), _flat_settings(restored)
    return [
        f"{_setting_name(key)}: {mine.get(key)!r} -> {theirs.get(key)!r}"
        for key in sorted(mine.keys() | theirs.keys())
        if not same_setting(mine.get(key), theirs.get(key))
    ]


def _flat_settings(settings: dict[str, Any]) -> dict[tuple[int, str], Any]:
    """:func:`schedule_settings` as one mapping: ``(-1, key)`` for the scheduler's state,
    ``(i, key)`` for param_groups[i]'s."""
    flat = {(-1, key): value for key, value in (settings.get("scheduler") or {}).items()}
    for index, group in enumerate(settings.get("param_groups") or []):
        flat.update({(index, key): value for key, value in group.items()})
    return flat


def _setting_name(key: tuple[int, str]) -> str:
    index, name = key
    return name if index < 0 else f"param_groups[{index}].{name}"


def same_setting(stored: Any, configured: Any) -> bool:
    """Equal settings, tuples and lists alike, floats to rounding."""
    if isinstance(stored, dict) and isinstance(configured, dict):
        return stored.keys() == configured.keys() and all(
            same_setting(stored[k], configured[k]) for k in stored
        )
    if isinstance(stored, list | tuple) and isinstance(configured, list | tuple):
        return len(stored) == len(configured) and all(
            same_setting(a, b) for a, b in zip(stored, configured, strict=True)
        )
    if isinstance(stored, bool) or isinstance(configured, bool):
        return stored == configured
    if isinstance(stored, int | float) and isinstance(configured, int | float):
        return math.isclose(stored, configured, rel_tol=1e-9, abs_tol=0.0)
    return stored == configured
