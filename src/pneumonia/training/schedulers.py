"""Learning-rate schedules over a whole run that torch has no plain-argument class for.

torch builds warm-up followed by cosine decay from ``SequentialLR`` and other scheduler objects,
which a config or a checkpoint cannot hold as data (see :mod:`pneumonia.model.registry`), so it
is one class here. Its ``total_steps`` (like ``OneCycleLR``'s) may be left ``null`` in a config:
``XrayClassifier.configure_optimizers`` fills in the run's optimiser steps.
"""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LRScheduler

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
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
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
