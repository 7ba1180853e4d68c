"""The errors this framework raises on purpose. Each message names the path or value and the fix."""

from __future__ import annotations

from hydra.errors import CompactHydraException


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
