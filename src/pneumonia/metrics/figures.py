"""Figures for people: the confusion matrix as a labelled heat map."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # headless: figures go to files and TensorBoard, never to a window

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure


def confusion_matrix_figure(
    confusion: np.ndarray, class_names: Sequence[str], title: str = "Confusion matrix"
) -> Figure:
    """Heat map of ``confusion`` (rows: true class, columns: predicted) with counts and row percentages."""
    confusion = np.asarray(confusion)
    row_totals = confusion.sum(axis=1, keepdims=True)
    shares = np.divide(confusion, row_totals, out=np.zeros(confusion.shape), where=row_totals > 0)
    fig, ax = plt.subplots(figsize=(4.2, 3.8), dpi=100)
    ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for (row, col), count in np.ndenumerate(confusion):
        ax.text(
            col,
            row,
            f"{count}\n{shares[row, col]:.1%}",
            ha="center",
            va="center",
            color="white" if shares[row, col] > 0.5 else "black",
        )
    ticks = np.arange(len(class_names))
    ax.set_xticks(ticks, labels=class_names)
    ax.set_yticks(ticks, labels=class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    return fig
