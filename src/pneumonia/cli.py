"""Console scripts: ``pneumonia-train``, ``pneumonia-explain`` and ``pneumonia-predict``.

Each composes the project's ``conf/`` tree with Hydra, exactly as ``train.py``, ``explain.py`` and
``predict.py`` do (they call these functions), and hands the config to the package. The config
tree is found beside the package's source (an editable install or a checkout), or where
``PNEUMONIA_ROOT`` points. ``pneumonia-compare`` is :func:`pneumonia.compare.main`.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig


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
        return getattr(importlib.import_module(module), function)(cfg)

    return main()


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
