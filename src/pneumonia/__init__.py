"""Train, compare and explain CNN classifiers of pediatric chest X-rays (NORMAL vs PNEUMONIA).

Package layout:
    data/       finding images, patient-grouped splits, the decoded-image cache, the DataModule
    model/      the study's CNN and the LightningModule that trains it
    metrics/    diagnostic metrics from one confusion matrix, and their figures
    training/   the Hydra-driven run: fit, test, evaluate a checkpoint, resume
"""

__version__ = "0.1.0"

CLASS_NAMES: tuple[str, str] = ("NORMAL", "PNEUMONIA")
"""Label 0 and label 1. PNEUMONIA is the positive class."""
