"""Finding and validating checkpoints: ``ckpt_path=last``, run folders, and foreign files."""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from pneumonia.errors import CheckpointError
from pneumonia.model.registry import UnsafeConfigError, check_bounded

if TYPE_CHECKING:
    from pneumonia.model.classifier import XrayClassifier

__all__ = [
    "CHECKPOINT_DIR",
    "LAST",
    "CheckpointError",
    "best_checkpoint",
    "is_inside",
    "last_checkpoint",
    "load_classifier",
    "read_checkpoint",
    "read_hyperparameters",
    "recorded_score",
    "resolve_checkpoint",
]

LAST = "last"
CHECKPOINT_DIR = "checkpoints"
"""Where a run folder keeps its checkpoints (``conf/callbacks/default.yaml``'s ``dirpath``)."""
log = logging.getLogger(__name__)


def last_checkpoint(run_dir: str | Path) -> Path:
    """``<run_dir>/checkpoints/last.ckpt``, where a resume, an evaluation and a sweep rerun look."""
    return Path(run_dir) / CHECKPOINT_DIR / "last.ckpt"


def is_inside(path: str | Path, folder: str | Path) -> bool:
    """Whether ``path`` lies below ``folder``, links and ``..`` resolved."""
    return Path(folder).resolve() in Path(path).expanduser().resolve().parents


def _model_checkpoint_state(path: str | Path) -> dict[str, Any]:
    """The ModelCheckpoint callback's saved state in a checkpoint file (empty if it has none)."""
    callbacks = read_checkpoint(path).get("callbacks")
    for value in callbacks.values() if isinstance(callbacks, dict) else ():
        # Keyed by the callback's class name (ModelCheckpoint, RunCheckpoint, ...) and settings.
        if isinstance(value, dict) and "best_model_path" in value and "dirpath" in value:
            return value
    return {}


def best_checkpoint(run_dir: str | Path) -> Path | None:
    """The best checkpoint of a run folder, as its ``last.ckpt``'s ModelCheckpoint state records it.

    The recorded path is looked up by name inside ``run_dir``, so a moved or copied run still works.
    """
    last = last_checkpoint(run_dir)
    folder = last.parent
    if not last.is_file():
        return None
    recorded = _model_checkpoint_state(last).get("best_model_path")
    candidate = folder / Path(str(recorded)).name if recorded else None
    if candidate is not None and not (candidate.suffix == ".ckpt" and candidate.is_file()):
        log.warning(
            "%s records its best checkpoint as %s, which is not a checkpoint in %s; using "
            "last.ckpt", last, Path(str(recorded)).name, folder,
        )  # fmt: skip
        return None
    return candidate


def recorded_score(path: str | Path) -> float | None:
    """The monitored score a ModelCheckpoint recorded when it saved ``path`` (``None`` if absent)."""
    score = _model_checkpoint_state(path).get("best_model_score")
    return float(score) if score is not None else None


def resolve_checkpoint(
    ckpt_path: str | Path | None, output_dir: str | Path, prefer_best: bool = False
) -> Path | None:
    """Turn the ``ckpt_path`` config value into a checkpoint file.

    ``None`` -> no checkpoint; ``"last"`` -> ``<output_dir>/checkpoints/last.ckpt`` (the run folder
    being written, so ``run_dir=<interrupted run> ckpt_path=last`` resumes in place); a run folder ->
    its best checkpoint when ``prefer_best`` (evaluating, explaining) and one is recorded, else its
    ``checkpoints/last.ckpt`` (resuming); a file -> itself.
    """
    if ckpt_path is None or str(ckpt_path) == "":
        return None
    if str(ckpt_path) == LAST:
        path = last_checkpoint(output_dir)
        if not path.is_file():
            raise CheckpointError(
                f"ckpt_path=last, but {path} does not exist. To resume an interrupted run, point the "
                "run at its folder: run_dir=<that run's folder> ckpt_path=last (with the same overrides), "
                "or pass ckpt_path=<file.ckpt>"
            )
        return path
    path = Path(ckpt_path).expanduser()
    if path.is_dir() and path.name == CHECKPOINT_DIR and not (path / CHECKPOINT_DIR).is_dir():
        path = path.parent  # the run's checkpoints folder names the run
    if path.is_dir() and not (path / CHECKPOINT_DIR).is_dir():
        raise CheckpointError(_not_a_run_folder(path))
    if path.is_dir():
        best = best_checkpoint(path) if prefer_best else None
        path = best or last_checkpoint(path)
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {path} does not exist; pass ckpt_path=<file.ckpt> or a run folder that has "
            "checkpoints/last.ckpt"
        )
    return path


def _not_a_run_folder(path: Path) -> str:
    """Why ``ckpt_path=<folder>`` names no checkpoint, saying what the folder is when it can."""
    if (path / "multirun.yaml").is_file():
        what = "it is a sweep's folder; pass one of its job folders"
    elif evaluated := _evaluated_checkpoint(path):
        what = f"it is an evaluation or explanation of {evaluated}; pass that instead"
    else:
        what = "it is not a training run's folder, or that run stopped before its first checkpoint"
    return (
        f"{path} holds no {CHECKPOINT_DIR}/ folder: {what}. Pass ckpt_path=<a run folder from "
        f"outputs/runs/, which holds {CHECKPOINT_DIR}/> or ckpt_path=<file.ckpt>"
    )


def _evaluated_checkpoint(folder: Path) -> str | None:
    """The checkpoint an evaluation or explanation folder records, if it records one."""
    for name in ("test_metrics.json", "trust.json"):
        try:
            value = json.loads((folder / name).read_text()).get("checkpoint")
        except (OSError, ValueError, AttributeError):
            continue
        # The checkpoint of another run, still there: a run's own folder without its
        # checkpoints (copied without the .ckpt files) records one inside itself.
        if isinstance(value, str) and Path(value).is_file() and not is_inside(value, folder):
            return value
    return None


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A pneumonia checkpoint as a dict, read safely (``weights_only=True``) and checked for shape.

    Raises:
        CheckpointError: naming ``path``: not a torch checkpoint, needs unsafe unpickling, or was
            not written by ``XrayClassifier``.
    """
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # whatever a file that is not a checkpoint makes torch raise
        raise CheckpointError(
            f"{path} is not a checkpoint that loads safely with weights_only=True "
            f"({_load_failure(err)}); use a checkpoint written by train.py"
        ) from err
    try:
        check_bounded(checkpoint, "the checkpoint")
    except UnsafeConfigError as err:
        raise CheckpointError(f"{path} was refused: {err}") from err
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    if not isinstance(hparams, dict) or "net" not in hparams or "state_dict" not in checkpoint:
        raise CheckpointError(
            f"{path} is not a pneumonia XrayClassifier checkpoint (no 'net' hyperparameters); "
            "use a checkpoint written by train.py"
        )
    return checkpoint


def _load_failure(err: Exception) -> str:
    """What torch refused, without its advice to load with ``weights_only=False``, which would run
    whatever code the file holds."""
    text = str(err)
    if isinstance(err, pickle.UnpicklingError) and "WeightsUnpickler error:" in text:
        refused = text.split("WeightsUnpickler error:", 1)[1].strip().splitlines()
        return f"it needs unsafe unpickling: {refused[0] if refused else 'unknown'}"
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"


def read_hyperparameters(path: str | Path) -> dict[str, Any]:
    """The hyperparameters of a pneumonia checkpoint, read safely (see :func:`read_checkpoint`)."""
    return read_checkpoint(path)["hyper_parameters"]


def load_classifier(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[XrayClassifier, dict[str, Any]]:
    """The checkpoint's classifier in eval mode on ``device``, and its hyperparameters.

    Raises:
        CheckpointError: naming the file, when it is not a pneumonia checkpoint that loads safely
            (checked before Lightning reads it).
    """
    # Imported here: config.py imports this module and must not pull in Lightning.
    from pneumonia.model.classifier import XrayClassifier

    hparams = read_hyperparameters(path)
    module = XrayClassifier.load_from_checkpoint(path, map_location=device, weights_only=True)
    return module.eval(), hparams
