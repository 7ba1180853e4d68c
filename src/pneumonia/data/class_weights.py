"""Class weighting strategies: a callable from training labels to one weight per class.

Config group ``class_weighting`` swaps them (``none`` or ``balanced``). They only ever see the
training split's labels, so validation and test data never leak into the loss.
"""

from __future__ import annotations

import numpy as np
from sklearn.utils.class_weight import compute_class_weight

NUM_CLASSES = 2


def balanced_class_weights(labels: np.ndarray) -> np.ndarray:
    """scikit-learn's ``compute_class_weight("balanced")``: ``n_samples / (n_classes * count_c)``.

    Raises:
        ValueError: a class is absent from ``labels`` (its weight would be infinite).
    """
    labels = np.asarray(labels)
    present = np.unique(labels)
    if len(present) < NUM_CLASSES:
        raise ValueError(
            f"balanced class weights need both classes in the training split, found only {present.tolist()}; "
            "add images of the missing class or use class_weighting=none"
        )
    return compute_class_weight("balanced", classes=np.arange(NUM_CLASSES), y=labels)


def no_class_weights(labels: np.ndarray) -> np.ndarray:
    """Every class weighs 1: the plain, unweighted loss."""
    return np.ones(NUM_CLASSES)
