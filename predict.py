"""Predict P(PNEUMONIA) for any chest X-rays with a trained checkpoint, and write them to a CSV.

    python predict.py ckpt_path=outputs/runs/<run> images=<folder>     # its best checkpoint
    python predict.py ckpt_path=<file.ckpt> images=<file.jpeg> threshold=0.3
    python predict.py ckpt_path=<run> images=<list.txt> output=<file.csv> device=cuda

Writes predictions.csv (path, p_pneumonia, decision, threshold[, label]) and unreadable.csv
(path, reason) to outputs/predictions/<date>_<time>/, or beside output=<file.csv>.
"""

import os
from pathlib import Path

# Lets conf/paths resolve outputs/ and data/ inside the project whatever the working directory.
os.environ.setdefault("PNEUMONIA_ROOT", str(Path(__file__).resolve().parent))

from pneumonia.cli import predict

if __name__ == "__main__":
    predict()
