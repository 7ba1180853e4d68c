"""Batch prediction: P(PNEUMONIA) and a decision at the checkpoint's threshold for any images.

``predict.py`` composes ``conf/predict.yaml`` and calls :func:`predict_images`; the inputs a run
accepts are resolved by :func:`pneumonia.predict.inputs.collect_inputs`.
"""

from pneumonia.predict.inputs import InputImage, collect_inputs
from pneumonia.predict.run import (
    Prediction,
    PredictionReport,
    check_predict_config,
    predict_images,
    score_images,
)

__all__ = [
    "InputImage",
    "Prediction",
    "PredictionReport",
    "check_predict_config",
    "collect_inputs",
    "predict_images",
    "score_images",
]
