"""Console scripts: ``pneumonia-train``, ``pneumonia-explain`` and ``pneumonia-predict``.

Each composes the project's ``conf/`` tree with Hydra, exactly as ``train.py``, ``explain.py`` and
``predict.py`` do (they call these functions), and hands the config to the package. The config
tree is found beside the package's source (an editable install or a checkout), or where
``PNEUMONIA_ROOT`` points. ``pneumonia-compare`` is :func:`pneumonia.compare.main`.

An error this package raises on purpose (a ``raise`` in its own code: a missing path, a refused
checkpoint, a contradicting setting, a diverged run) ends a single run with its message alone, not
a traceback through Lightning and Hydra; so does a config value that a constructor refused
(Hydra's ``InstantiationException``). Anything else keeps its traceback: it is a bug to report. In
a multirun each job's error goes to the sweep as before, and ``HYDRA_FULL_ERROR=1`` shows every
traceback.
"""

from __future__ import annotations

import importlib
import linecache
import os
import signal
import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

import pneumonia
from pneumonia.errors import UserError, refused_construction

# The types of the errors this package raises with a message for the user. Not RuntimeError:
# raised bare in the package it marks a broken invariant (a bug), as NotImplementedError does.
_DELIBERATE_TYPES = (ValueError, TypeError, OSError)


def project_root() -> Path:
    """The folder holding ``conf/``: ``$PNEUMONIA_ROOT``, else the checkout this package is in."""
    root = Path(os.environ.get("PNEUMONIA_ROOT") or Path(__file__).resolve().parents[2])
    if not (root / "conf" / "train.yaml").is_file():
        sys.exit(
            f"no config tree at {root / 'conf'}: install the package from its checkout "
            "(pip install -e <checkout>) or set PNEUMONIA_ROOT=<checkout>"
        )
    # conf/paths resolves outputs/ and data/ inside the project, whatever the working directory.
    os.environ.setdefault("PNEUMONIA_ROOT", str(root))
    return root


def _config_dir() -> str:
    return str(project_root() / "conf")


def _command(config_name: str, task: str) -> Any:
    """Compose ``conf/<config_name>.yaml`` from the command line and call ``module:function`` on it.

    The task is imported only once the config is composed, so ``--help`` answers at once.
    """
    import pneumonia.hydra_hooks  # noqa: F401  (registers the ${pneumonia.*} resolvers)

    @hydra.main(version_base="1.3", config_path=_config_dir(), config_name=config_name)
    def main(cfg: DictConfig) -> Any:
        from pneumonia.console import tidy_lightning_console

        tidy_lightning_console()
        module, function = task.split(":")
        try:
            from pneumonia.config import check_added_keys
            from pneumonia.hydra_hooks import hydra_choices, task_overrides

            check_added_keys(cfg, task_overrides(), groups=hydra_choices())
            return getattr(importlib.import_module(module), function)(cfg)
        except Exception as error:
            message = user_error_message(error)
            if message is None or not _single_run() or os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            raise UserError(message) from error

    return main()


def user_error_message(error: BaseException) -> str | None:
    """What to print instead of a traceback, or None when the traceback is worth reading.

    An error of a class this package defines, or raised by a ``raise`` statement in its source,
    is deliberate: its message names the path or value and the fix. A ``KeyError`` of a dict lookup
    or a ``ValueError`` of ``int("x")`` there is not (no ``raise``). A config value a constructor
    refused comes wrapped in Hydra's ``InstantiationException``, whose message names the target,
    the refusal and the key.
    """
    refused = refused_construction(error)
    if refused is not None:
        return refused
    if not str(error).strip():
        return None  # nothing to say without the traceback
    ours = type(error).__module__.split(".")[0] == pneumonia.__name__
    if ours or (isinstance(error, _DELIBERATE_TYPES) and _raised_in_package(error)):
        return f"{type(error).__name__}: {error}"
    return None


def _raised_in_package(error: BaseException) -> bool:
    """Whether ``error`` comes from a ``raise`` statement in this package's source."""
    traceback = error.__traceback__
    if traceback is None:
        return False
    while traceback.tb_next is not None:
        traceback = traceback.tb_next
    filename = traceback.tb_frame.f_code.co_filename
    package = Path(pneumonia.__file__).resolve().parent
    if not Path(filename).resolve().is_relative_to(package):
        return False
    return linecache.getline(filename, traceback.tb_lineno).lstrip().startswith("raise ")


def _single_run() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.RUN


def exit_on_sigterm() -> None:
    """Let SIGTERM end the command as Ctrl-C does: its ``finally`` clauses run (the side file of an
    unfinished CSV is removed, the folder's lock released) and it exits with status 143.

    Python's default would end the process on the spot. train.py leaves SIGTERM to Lightning,
    which stops the fit and says how to resume.
    """
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(128 + signum))


def train() -> None:
    """``python train.py`` / ``pneumonia-train``: fit, test, sweep or evaluate (conf/train.yaml)."""
    _command("train", "pneumonia.training.run:run")


def explain() -> None:
    """``python explain.py`` / ``pneumonia-explain``: attribution maps of a checkpoint."""
    exit_on_sigterm()
    _command("explain", "pneumonia.explain.run:explain_checkpoint")


def predict() -> None:
    """``python predict.py`` / ``pneumonia-predict``: P(PNEUMONIA) of any images, as a CSV."""
    exit_on_sigterm()
    _command("predict", "pneumonia.predict.run:predict_images")
