"""The errors this framework raises on purpose. Each message names the path or value and the fix."""

from __future__ import annotations

import re

from hydra.errors import CompactHydraException, InstantiationException


class CheckpointError(ValueError):
    """A checkpoint path that does not lead to a loadable, trustworthy pneumonia checkpoint."""


class ConfigError(ValueError):
    """A composed config that cannot run: values that contradict each other or name nothing."""


class TrainingDivergedError(RuntimeError):
    """The training loss became NaN or infinite; the run stops instead of training on garbage."""


class NothingTrainedError(RuntimeError):
    """A fit that took no optimizer step: there is no trained model whose metrics could be reported."""


class NeverValidatedError(RuntimeError):
    """A fit that tests but never validated: no checkpoint was chosen and no operating point fitted."""


class SplitChangedError(ValueError):
    """A run would get a different train/val/test split than the one it was started with."""


class NonFiniteOutputError(RuntimeError):
    """A network whose outputs are NaN or infinite: its metrics would mean nothing."""


class SweepError(CompactHydraException):
    """A search that cannot start, or that ended with no completed trial.

    A :class:`hydra.errors.CompactHydraException`: Hydra prints only its message, not a traceback
    through its own sweeper code, which would say nothing to the user.
    """


class RunFolderBusyError(RuntimeError):
    """Another live process is working in the run folder (its lock is held)."""


class UserError(CompactHydraException):
    """A deliberate error of a single run, shown as its message alone (see :mod:`pneumonia.cli`).

    Hydra prints a :class:`~hydra.errors.CompactHydraException` without a traceback and exits 1;
    the error that was raised is its ``__cause__``, and ``HYDRA_FULL_ERROR=1`` shows both.
    """


def refused_construction(error: BaseException) -> str | None:
    """``<Type>: <refusal> (building <key>)`` for a config value a constructor refused, else None.

    Hydra wraps what a ``_target_`` raised in an ``InstantiationException`` whose first line only
    names the target; the refusal (a ``ValueError`` or a ``TypeError`` such as an unexpected
    keyword) is its cause, and the config key is on its last line.
    """
    cause = error.__cause__
    if not isinstance(error, InstantiationException) or not isinstance(
        cause, ValueError | TypeError
    ):
        return None
    key = re.search(r"full_key: (\S+)", str(error))
    return f"{type(cause).__name__}: {cause}" + (f" (building {key.group(1)})" if key else "")
