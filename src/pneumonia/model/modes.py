"""Running a network in eval mode for a while (prediction, attribution, a trust check) and giving
every submodule its own mode back afterwards."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule of ``model`` in eval mode, then restore each one's own previous mode.

    ``model.train(previous)`` would not do: it overwrites a mix of modes (e.g. a frozen, eval-mode
    backbone inside a training model) with a single flag.
    """
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training
