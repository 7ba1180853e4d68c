"""Train, compare and explain CNN classifiers of pediatric chest X-rays (NORMAL vs PNEUMONIA).

Package layout:
    data/       finding images, patient-grouped splits, the decoded-image cache, the DataModule
    model/      the networks by name, batch augmentation and normalisation, the LightningModule
    metrics/    diagnostic metrics, calibration, operating points, external sets, the shift suite
    explain/    attribution methods, their trust checks and rendering, the callback, explain.py
    predict/    predict.py: a CSV of probabilities and decisions for a file or folder
    sweeps/     the ranked summary of a multirun and the Optuna study
    training/   the Hydra-driven run: fit, test, evaluate a checkpoint, resume
"""

import numbers

__version__ = "0.1.0"

CLASS_NAMES: tuple[str, str] = ("NORMAL", "PNEUMONIA")
"""Label 0 and label 1. PNEUMONIA is the positive class."""

MIN_IMAGE_SIZE = 32
"""The smallest side the networks take: the study CNN halves it three times."""

MAX_IMAGE_SIZE = 1024
"""The largest side accepted. The study CNN's first linear layer grows with the square of the side
(268 M weights at 1024, 1.1 G at 2048, 4 GB before Adam's state), so a larger value, typed or read
from a checkpoint, would exhaust memory instead of training; the X-rays themselves are 1-3 k px."""


def is_whole_number(value: object) -> bool:
    """An integer (Python's or numpy's), and not a bool, which Python counts as one."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_image_size(image_size: object, key: str = "image_size") -> int:
    """``image_size`` as an int, or ValueError naming ``key`` and the supported range."""
    if not is_whole_number(image_size):
        raise ValueError(f"{key}={image_size!r} must be a whole number of pixels")
    image_size = int(image_size)
    if not MIN_IMAGE_SIZE <= image_size <= MAX_IMAGE_SIZE:
        raise ValueError(
            f"{key}={image_size} is outside the supported sizes {MIN_IMAGE_SIZE}..{MAX_IMAGE_SIZE}; "
            "the study trains at 128"
        )
    return image_size
