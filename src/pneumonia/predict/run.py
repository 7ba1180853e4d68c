"""``predict.py``'s task: P(PNEUMONIA) and a decision for every image given, written to a CSV.

The CSV (``predictions.csv`` in the run folder, or ``output=<file.csv>``) has one row per image
that could be read, in input order::

    path,p_pneumonia,decision,threshold[,label]

``p_pneumonia`` is the checkpoint's calibrated probability, computed in float64 and written in
full (the shortest text that reads back as the same number: rounding would tie probabilities
near 1 again, and disagree with ``decision`` next to the threshold), ``decision`` is
``PNEUMONIA`` when it is at or above ``threshold`` and ``NORMAL`` otherwise, and ``threshold`` is
the one used: the checkpoint's stored threshold, or ``threshold=<number>``. ``label`` is there
when some image's path has a ``NORMAL`` or ``PNEUMONIA`` folder, and empty for the others. Files
that cannot be read go to ``unreadable.csv`` beside it (``path,reason``); they are counted, never
fatal, unless no image at all could be read.
"""

from __future__ import annotations

import csv
import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from pneumonia import CLASS_NAMES, is_whole_number
from pneumonia.config import check_ckpt_path, check_threshold_override
from pneumonia.data.image_io import decode_or_reason
from pneumonia.devices import resolve_device
from pneumonia.errors import ConfigError, NonFiniteOutputError
from pneumonia.files import remove_stale_side_files, written_aside
from pneumonia.model.classifier import XrayClassifier
from pneumonia.predict.inputs import WHAT_TO_PASS, InputImage, collect_inputs
from pneumonia.training.checkpoints import load_classifier, resolve_checkpoint

log = logging.getLogger(__name__)

COLUMNS = ("path", "p_pneumonia", "decision", "threshold")
UNREADABLE_COLUMNS = ("path", "reason")
#: Decoding threads when ``num_workers`` is null (PIL releases the GIL while decoding and resizing).
DEFAULT_WORKERS = 4


@dataclass(frozen=True)
class Prediction:
    """One scored image."""

    image: InputImage
    probability: float
    threshold: float

    @property
    def decision(self) -> str:
        return CLASS_NAMES[1] if self.probability >= self.threshold else CLASS_NAMES[0]


@dataclass(frozen=True)
class PredictionReport:
    """What :func:`predict_images` did; the CSVs hold the same."""

    checkpoint: Path
    threshold: float
    threshold_source: str
    predictions: list[Prediction]
    unreadable: dict[str, str]
    output: Path
    unreadable_output: Path

    @property
    def pneumonia(self) -> int:
        return sum(p.decision == CLASS_NAMES[1] for p in self.predictions)

    def summary(self) -> str:
        return (
            f"predicted {len(self.predictions)} image{'' if len(self.predictions) == 1 else 's'}: "
            f"{self.pneumonia} PNEUMONIA at threshold "
            f"{format_threshold(self.threshold)} ({self.threshold_source}), "
            f"{len(self.unreadable)} unreadable"
            + (f" (listed in {self.unreadable_output})" if self.unreadable else "")
            + f"; wrote {self.output}"
        )


# ----- configuration ---------------------------------------------------------------------------
def check_predict_config(cfg: DictConfig) -> None:
    """Refuse a predict config with a missing or out-of-range value, before anything is loaded.

    Raises:
        ConfigError: naming the key, its value and what it accepts.
    """
    check_ckpt_path(cfg)
    if OmegaConf.is_missing(cfg, "images") or cfg.get("images") in (None, ""):
        raise ConfigError(f"images is required; {WHAT_TO_PASS.removeprefix('pass ')}")
    batch_size = cfg.get("batch_size")
    if not is_whole_number(batch_size) or batch_size < 1:
        raise ConfigError(f"batch_size={batch_size!r} must be a whole number of at least 1")
    workers = cfg.get("num_workers")
    if workers is not None and (not is_whole_number(workers) or workers < 0):
        raise ConfigError(
            f"num_workers={workers!r} must be a whole number of at least 0 (0: decode in the main "
            f"thread) or null ({DEFAULT_WORKERS} threads at most)"
        )
    check_threshold_override("threshold", cfg.get("threshold"))
    resolve_device(cfg.get("device"))
    output = cfg.get("output")
    if output is not None and Path(str(output)).expanduser().is_dir():
        raise ConfigError(f"output={output} is a folder; pass output=<file.csv>")
    if output is not None and not _is_replaceable(Path(str(output)).expanduser()):
        raise ConfigError(
            f"output={output} exists and is not a predictions CSV that predict.py wrote (its "
            f"header is not {','.join(COLUMNS)}...); it is left alone: pass another output=<file.csv>"
        )
    if output is not None and Path(str(output)).suffix.lower() != ".csv":
        # Never overwrite a checkpoint, an image or anything else that is not a table.
        raise ConfigError(f"output={output} must be a .csv file; pass output=<file.csv>")


def format_threshold(threshold: float) -> str:
    """The shortest text of a threshold: ``0.4`` for the float32 value a checkpoint stores."""
    single = np.float32(threshold)
    if float(single) == threshold:
        return np.format_float_positional(single, trim="0")
    return repr(float(threshold))


# ----- scoring ---------------------------------------------------------------------------------
def score_images(
    module: XrayClassifier,
    images: Sequence[InputImage],
    batch_size: int = 64,
    num_workers: int = DEFAULT_WORKERS,
    progress: bool = True,
) -> Iterator[tuple[InputImage, float | str]]:
    """P(PNEUMONIA) of each image, or why it could not be read, in input order.

    Images are decoded in batches by ``num_workers`` threads (0: in this thread), one batch ahead
    of the network, with a progress bar over images.

    Raises:
        NonFiniteOutputError: the network gave a NaN or infinite probability.
    """
    size = int(module.hparams.image_size)
    batches = [images[i : i + batch_size] for i in range(len(images))[::batch_size]]
    pool = ThreadPoolExecutor(num_workers, thread_name_prefix="decode") if num_workers else None

    def start(batch: Sequence[InputImage]) -> Callable[[], list[np.ndarray | str]]:
        """Start decoding ``batch`` (in the threads, if any); the returned call waits for it."""
        if pool is None:
            return lambda: [decode_or_reason(item.path, size) for item in batch]
        futures = [pool.submit(decode_or_reason, item.path, size) for item in batch]
        return lambda: [future.result() for future in futures]

    bar = tqdm(total=len(images), desc="predicting", unit="img", disable=not progress)
    with pool or nullcontext(), bar:
        pending = start(batches[0]) if batches else None
        for k, batch in enumerate(batches):
            decoded = pending()
            if k + 1 < len(batches):
                pending = start(batches[k + 1])  # with threads: decoded while this batch is scored
            readable = [i for i, value in enumerate(decoded) if isinstance(value, np.ndarray)]
            scores: dict[int, float | str] = {i: decoded[i] for i in range(len(batch))}
            if readable:
                pixels = torch.from_numpy(np.stack([decoded[i] for i in readable])).unsqueeze(1)
                probabilities = module.predict_proba(pixels).cpu().tolist()
                for i, probability in zip(readable, probabilities, strict=True):
                    if not math.isfinite(probability):
                        raise NonFiniteOutputError(
                            f"the network gave P(PNEUMONIA)={probability} for {batch[i].path}; "
                            "the checkpoint does not give meaningful predictions"
                        )
                    scores[i] = probability
            yield from ((item, scores[i]) for i, item in enumerate(batch))
            bar.update(len(batch))


# ----- the task --------------------------------------------------------------------------------
def _is_replaceable(path: Path) -> bool:
    """Whether ``output=path`` may be written: a new file, or an earlier predictions CSV (whose
    header starts with ``COLUMNS``), never another file such as a run's ``split.csv``."""
    if not path.exists():
        return True
    if not path.is_file():
        return False
    try:
        with path.open(newline="", encoding="utf-8") as file:
            header = next(csv.reader(file), [])
    except (OSError, UnicodeDecodeError, csv.Error):
        return False
    return tuple(header[: len(COLUMNS)]) == COLUMNS


def output_paths(cfg: DictConfig) -> tuple[Path, Path]:
    """The predictions CSV and the ``unreadable.csv`` beside it.

    A custom ``output=<name>.csv`` gets ``<name>_unreadable.csv``, so two outputs in one folder
    keep their own lists.
    """
    output = cfg.get("output")
    path = (
        Path(str(output)).expanduser() if output else Path(cfg.paths.output_dir) / "predictions.csv"
    )
    name = "unreadable.csv" if path.name == "predictions.csv" else f"{path.stem}_unreadable.csv"
    return path, path.with_name(name)


def predict_images(cfg: DictConfig) -> PredictionReport:
    """Score every image of ``cfg.images`` with ``cfg.ckpt_path`` and write the CSVs.

    Raises:
        ConfigError: a config value out of range (before anything is loaded).
        CheckpointError: the checkpoint is missing or refused.
        FileNotFoundError: ``images`` names nothing to score.
        ValueError: no image could be read (both CSVs are written first).
    """
    check_predict_config(cfg)
    device = resolve_device(cfg.device)
    output, unreadable_output = output_paths(cfg)
    ckpt_path = resolve_checkpoint(cfg.ckpt_path, output.parent, prefer_best=True)
    inputs = collect_inputs(cfg.images)
    module, _ = load_classifier(ckpt_path, device)
    if cfg.threshold is None:
        threshold, source = module.threshold, "stored in the checkpoint"
    else:
        threshold, source = float(cfg.threshold), "threshold= override"
    workers = cfg.num_workers
    if workers is None:
        workers = min(DEFAULT_WORKERS, os.cpu_count() or 1)
    log.info(
        "predicting %d images with %s (%dpx, threshold %s %s, device %s)",
        len(inputs.images),
        ckpt_path,
        int(module.hparams.image_size),
        format_threshold(threshold),
        source,
        device,
    )

    with_labels = any(item.label is not None for item in inputs.images)
    columns = (*COLUMNS, "label") if with_labels else COLUMNS
    unreadable = dict(inputs.skipped)
    predictions: list[Prediction] = []
    output.parent.mkdir(parents=True, exist_ok=True)
    for path in (output, unreadable_output):  # what an earlier predict killed outright left
        remove_stale_side_files(path.parent, target=path.name)
    # Written row by row to a side file, renamed when complete: an interrupted run leaves no
    # complete-looking CSV behind.
    with written_aside(output) as partial, partial.open("w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(columns)
        for item, score in score_images(
            module, inputs.images, cfg.batch_size, workers, cfg.get("progress", True)
        ):
            if isinstance(score, str):
                unreadable[str(item.path)] = score
                log.warning("cannot read %s (%s); predicting the others", item.path, score)
                continue
            prediction = Prediction(item, score, threshold)
            predictions.append(prediction)
            row = [
                str(item.path),
                repr(float(score)),
                prediction.decision,
                format_threshold(threshold),
            ]
            writer.writerow([*row, item.label or ""] if with_labels else row)
    with (
        written_aside(unreadable_output) as partial,
        partial.open("w", newline="", encoding="utf-8") as file,
    ):
        writer = csv.writer(file)
        writer.writerow(UNREADABLE_COLUMNS)
        writer.writerows(unreadable.items())

    report = PredictionReport(
        ckpt_path, threshold, source, predictions, unreadable, output, unreadable_output
    )
    if not predictions:
        raise ValueError(
            f"none of the {len(inputs.images)} images given by images={cfg.images} could be read; "
            f"the reasons are in {unreadable_output}"
        )
    log.info(report.summary())
    return report
