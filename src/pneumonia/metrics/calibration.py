"""Calibration of the PNEUMONIA probability: temperature scaling, expected calibration error and
the reliability diagram.

Temperature scaling (Guo et al., 2017, "On Calibration of Modern Neural Networks") divides the
network's logit by one scalar ``T > 0`` fitted on the validation split to minimise the binary
negative log-likelihood; ``T > 1`` softens over-confident probabilities, ``T < 1`` sharpens them.
It never changes the ranking of the images, so AUROC is unchanged, while a fixed threshold such as
0.5 does move in probability terms.

Calibration error here is that of P(PNEUMONIA), the one probability the model outputs (see
:func:`expected_calibration_error`); the "top-label" ECE of multi-class papers, which bins
``max(p, 1 - p)`` against accuracy, is a different number and is not what is reported.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from pneumonia import is_whole_number

log = logging.getLogger(__name__)

TEMPERATURE_BOUNDS: tuple[float, float] = (0.05, 20.0)
# Equal-width bins of the calibration error and the reliability diagram (Guo et al. 2017 use 15).
ECE_BINS = 15


def _to_numpy(values: Any, name: str) -> np.ndarray:
    """``values`` (tensor on any device and of any float dtype, array or sequence) as float64 1-D."""
    if isinstance(values, torch.Tensor):
        values = values.detach().to(device="cpu", dtype=torch.float64).numpy()
    array = np.asarray(values, dtype=np.float64)
    if array.ndim > 1 and array.size != max(array.shape):
        raise ValueError(f"{name} must be one value per image, got shape {array.shape}")
    return array.reshape(-1)


def _checked_targets(targets: Any, size: int) -> np.ndarray:
    y = _to_numpy(targets, "targets")
    if y.size != size:
        raise ValueError(f"targets has {y.size} values but there are {size} predictions")
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("targets must be 0 (NORMAL) or 1 (PNEUMONIA)")
    return y


def _checked_probabilities(probabilities: Any, targets: Any) -> tuple[np.ndarray, np.ndarray]:
    p = _to_numpy(probabilities, "probabilities")
    y = _checked_targets(targets, p.size)
    if not (np.isfinite(p).all() and (p >= 0).all() and (p <= 1).all()):
        raise ValueError("probabilities must be finite and in [0, 1]")
    return p, y


def _nll(z: np.ndarray, y: np.ndarray, temperature: float) -> float:
    x = z / temperature
    # -[y log sigmoid(x) + (1 - y) log(1 - sigmoid(x))] = softplus(x) - y x, stable for any x.
    return float(np.mean(np.logaddexp(0.0, x) - y * x))


def binary_nll(logits: Any, targets: Any, temperature: float = 1.0) -> float:
    """Mean binary negative log-likelihood of ``sigmoid(logits / temperature)`` (nats, float64)."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    z = _to_numpy(logits, "logits")
    return _nll(z, _checked_targets(targets, z.size), float(temperature))


def _golden_section_minimum(
    f: Callable[[float], float], lo: float, hi: float, tol: float = 1e-9
) -> float:
    """The minimiser of a unimodal ``f`` on ``[lo, hi]`` (deterministic, about 50 evaluations)."""
    shrink = (math.sqrt(5.0) - 1.0) / 2.0
    c, d = hi - shrink * (hi - lo), lo + shrink * (hi - lo)
    fc, fd = f(c), f(d)
    while hi - lo > tol:
        if fc <= fd:
            hi, d, fd = d, c, fc
            c = hi - shrink * (hi - lo)
            fc = f(c)
        else:
            lo, c, fc = c, d, fd
            d = lo + shrink * (hi - lo)
            fd = f(d)
    return (lo + hi) / 2.0


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """The temperature ``T`` in [0.05, 20] minimising the binary NLL of ``sigmoid(logits / T)``.

    Fitted on validation logits (Guo et al., 2017). The NLL is convex in ``1 / T`` (a logistic
    regression through the origin on the logit), hence unimodal in ``log T``, so a golden-section
    search over ``log T`` in ``[log 0.05, log 20]`` finds the minimum deterministically; it runs in
    float64 on the CPU whatever the device and dtype of the inputs. Perfectly separated data would
    drive ``T`` to 0 and stop at the lower bound.

    Args:
        logits: ``(N,)`` pre-sigmoid scores of PNEUMONIA.
        targets: ``(N,)`` labels, 0 (NORMAL) or 1 (PNEUMONIA).

    Returns:
        The temperature; 1.0 (no change), with a warning, when there are fewer than 2 samples, one
        class only, or non-finite logits, where no temperature can be fitted.
    """
    z = _to_numpy(logits, "logits")
    y = _checked_targets(targets, z.size)
    reason = None
    if z.size < 2:
        reason = f"{z.size} validation sample(s)"
    elif y.min() == y.max():
        reason = "validation holds one class only"
    elif not np.isfinite(z).all():
        reason = "some validation logits are not finite"
    if reason is not None:
        log.warning("temperature scaling left at T = 1: %s", reason)
        return 1.0
    lo, hi = TEMPERATURE_BOUNDS
    log_t = _golden_section_minimum(lambda s: _nll(z, y, math.exp(s)), math.log(lo), math.log(hi))
    temperature = min(max(math.exp(log_t), lo), hi)
    # Never worse than leaving the logits alone (guards the tolerance of the search).
    return temperature if _nll(z, y, temperature) <= _nll(z, y, 1.0) else 1.0


def calibrated_probabilities(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``sigmoid(logits / temperature)`` in float32 (at least), on the logits' device."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    dtype = torch.promote_types(logits.dtype, torch.float32)
    return torch.sigmoid(logits.to(dtype) / temperature)


def _bin_statistics(
    p: np.ndarray, y: np.ndarray, n_bins: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Bin edges, and per bin: count, mean probability, fraction positive (NaN where empty)."""
    if not is_whole_number(n_bins) or n_bins < 1:
        raise ValueError(f"n_bins must be an integer >= 1, got {n_bins!r}")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # Bins [e0, e1), [e1, e2), ..., [e_{n-1}, 1]: 0 falls in the first, 1 in the last.
    index = np.digitize(p, edges[1:-1], right=False)
    counts = np.bincount(index, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_p = np.bincount(index, weights=p, minlength=n_bins) / counts
        positive = np.bincount(index, weights=y, minlength=n_bins) / counts
    return edges, counts, mean_p, positive


def expected_calibration_error(probabilities: Any, targets: Any, n_bins: int = ECE_BINS) -> float:
    """Expected calibration error of P(PNEUMONIA), the reliability of the positive-class probability.

    With ``n_bins`` equal-width bins over [0, 1] (``[0, 1/n), [1/n, 2/n), ..., [(n-1)/n, 1]``, so
    0 and 1 are both counted), ``N`` predictions and ``n_b`` of them in bin ``b``::

        ECE = sum_b (n_b / N) * | mean p in b  -  fraction of PNEUMONIA in b |

    This is not the "top-label" ECE (confidence ``max(p, 1 - p)`` against accuracy): a constant
    0.9 on half positive data scores 0.4 here.

    Args:
        probabilities: ``(N,)`` predicted P(PNEUMONIA) in [0, 1] (tensor, array or sequence).
        targets: ``(N,)`` labels, 0 or 1.
        n_bins: number of equal-width bins.

    Returns:
        The ECE in [0, 1]; NaN when there are no predictions.
    """
    p, y = _checked_probabilities(probabilities, targets)
    _, counts, mean_p, positive = _bin_statistics(p, y, n_bins)
    if p.size == 0:
        return float("nan")
    filled = counts > 0
    return float(np.sum(counts[filled] / p.size * np.abs(mean_p[filled] - positive[filled])))


def reliability_diagram(
    probabilities: Any, targets: Any, n_bins: int = ECE_BINS, title: str = ""
) -> Figure:
    """Observed fraction of PNEUMONIA per probability bin against the diagonal, counts below.

    The upper panel shows one bar per non-empty bin (height: fraction positive) and a dot at each
    bin's mean predicted probability, so a perfectly calibrated model has its dots on the dashed
    diagonal; the lower panel is the number of predictions per bin. The title carries the ECE of
    :func:`expected_calibration_error` with the same bins. Built without pyplot, so no global
    figure state is touched and nothing needs closing.
    """
    p, y = _checked_probabilities(probabilities, targets)
    edges, counts, mean_p, positive = _bin_statistics(p, y, n_bins)
    ece = expected_calibration_error(p, y, n_bins)
    centers, width = (edges[:-1] + edges[1:]) / 2, 1.0 / n_bins
    filled = counts > 0

    fig = Figure(figsize=(4.6, 5.0), dpi=100, layout="constrained")
    ax, ax_counts = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": (3, 1)})
    ax.bar(
        centers[filled],
        positive[filled],
        width=width,
        color="tab:blue",
        alpha=0.6,
        edgecolor="tab:blue",
        label="observed fraction PNEUMONIA",
    )
    ax.plot(mean_p[filled], positive[filled], "o", color="tab:red", ms=4, label="bin mean p")
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1, label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("fraction PNEUMONIA")
    ax.legend(loc="upper left", fontsize="small")
    ece_text = "n/a" if math.isnan(ece) else f"{ece:.3f}"
    ax.set_title(f"{title} (ECE = {ece_text})" if title else f"Reliability (ECE = {ece_text})")

    ax_counts.bar(centers, counts, width=width, color="grey", edgecolor="black", lw=0.5)
    ax_counts.set_xlabel("predicted P(PNEUMONIA)")
    ax_counts.set_ylabel("count")
    return fig
