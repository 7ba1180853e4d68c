"""Faithfulness of attribution maps: the deletion metric of Petsiuk et al. 2018 (RISE).

Pixels are removed (replaced by a baseline value) in the order an attribution map ranks them, most
important first, and the probability of the explained class is recorded after each step. A faithful
map points at the pixels the model actually uses, so the probability collapses early and the area
under the curve is small. The same curve with a random pixel order is the baseline a method has to
beat: a map that does no better than chance explains nothing about this model.

Shapes follow the package conventions: images ``(B, 1, H, W)`` in [0, 1], a class model returning
scores ``(B, 2)``, attributions ``(B, 1, H, W)``. The probability tracked is the one explain.py
shows: the classifier's calibrated P(PNEUMONIA) (``pneumonia_probabilities``) for PNEUMONIA and one
minus it for NORMAL; for a model without a calibration, the sigmoid of the class's score.
"""

from __future__ import annotations

import torch
from torch import nn

from pneumonia.explain.methods.common import pneumonia_probabilities
from pneumonia.model.modes import eval_mode

Baseline = float | str
"""A fill value for removed pixels, or ``"mean"`` for each image's own mean intensity."""


def _pixel_count(images: torch.Tensor) -> int:
    if images.dim() != 4:
        raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
    return images.shape[-2] * images.shape[-1]


def _flat_attributions(attributions: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """``(B, H*W)`` signed importance per pixel; several channels are summed, as Captum does."""
    batch, _, height, width = images.shape
    if attributions.dim() == 4:
        attributions = attributions.sum(dim=1)
    if attributions.shape != (batch, height, width):
        raise ValueError(
            f"attributions of shape {tuple(attributions.shape)} do not match images of shape "
            f"{tuple(images.shape)}; expected (B, 1, H, W) or (B, H, W)"
        )
    return attributions.reshape(batch, height * width)


def _fill_values(images: torch.Tensor, baseline: Baseline) -> torch.Tensor:
    """``(B, 1, 1, 1)`` value that replaces a removed pixel of each image."""
    if isinstance(baseline, str):
        if baseline != "mean":
            raise ValueError(f'baseline must be a number or "mean", got {baseline!r}')
        return images.mean(dim=(1, 2, 3), keepdim=True)
    return images.new_full((images.shape[0], 1, 1, 1), float(baseline))


def _removal_counts(pixels: int, steps: int) -> torch.Tensor:
    """``(steps + 1,)`` number of pixels removed at each step: 0, ..., ``pixels``."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    return torch.round(torch.linspace(0, pixels, steps + 1, dtype=torch.float64)).long()


def _target_probability(
    model: nn.Module, images: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    pneumonia = pneumonia_probabilities(model, model(images)).float()
    return torch.where(targets == 1, pneumonia, 1 - pneumonia)


def _deletion_probabilities(
    model: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    order: torch.Tensor,
    steps: int,
    baseline: Baseline,
    batch_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Curve for an explicit removal ``order`` ``(B, H*W)`` of pixel indices, first removed first."""
    batch, _, height, width = images.shape
    pixels = height * width
    counts = _removal_counts(pixels, steps).to(images.device)
    # rank[b, p] is the step index at which pixel p of image b is removed.
    positions = torch.arange(pixels, device=images.device).expand(batch, pixels)
    rank = torch.empty_like(order).scatter_(1, order, positions)
    fill = _fill_values(images, baseline)
    targets = targets.to(device=images.device, dtype=torch.long)

    # (step, image) pairs are flattened into one stream and evaluated in chunks, so short curves of
    # many images and long curves of few images both fill the forward passes.
    pairs = torch.cartesian_prod(
        torch.arange(steps + 1, device=images.device), torch.arange(batch, device=images.device)
    )
    probabilities = torch.empty(steps + 1, batch, device=images.device)
    with eval_mode(model), torch.no_grad():
        for chunk in pairs.split(max(1, batch_size)):
            step_index, image_index = chunk[:, 0], chunk[:, 1]
            removed = rank[image_index] < counts[step_index, None]
            removed = removed.view(-1, 1, height, width)
            chunk_images = torch.where(removed, fill[image_index], images[image_index])
            probabilities[step_index, image_index] = _target_probability(
                model, chunk_images, targets[image_index]
            )
    fractions = counts.double().div(pixels).to(torch.float32)
    return fractions, probabilities.t().contiguous()


def deletion_curve(
    model: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    attributions: torch.Tensor,
    steps: int = 20,
    baseline: Baseline = 0.0,
    batch_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Probability of the target class as the most-attributed pixels are removed.

    At step ``s`` the ``round(s / steps * H * W)`` pixels with the highest signed attribution are
    replaced by ``baseline``. Equal attributions are removed in raster order (lowest flat pixel
    index first), so the curve is deterministic; a map with large flat regions therefore gets a
    partly arbitrary order inside them. The model runs in eval mode under ``torch.no_grad()`` and
    every submodule's previous mode is restored afterwards.

    Args:
        model: class model, ``(N, 1, H, W)`` in [0, 1] -> scores ``(N, 2)``.
        images: ``(B, 1, H, W)`` inputs in [0, 1].
        targets: ``(B,)`` class whose probability is tracked (0 NORMAL, 1 PNEUMONIA).
        attributions: ``(B, 1, H, W)`` or ``(B, H, W)`` signed attributions for ``targets``.
        steps: number of removal steps; the curve has ``steps + 1`` points.
        baseline: value of removed pixels, or ``"mean"`` for each image's own mean intensity.
        batch_size: most images per forward pass; all (step, image) pairs are batched together.

    Returns:
        ``(fractions, probabilities)``: ``(steps + 1,)`` share of pixels removed, from 0 to 1, and
        ``(B, steps + 1)`` probability of the target class at each step.
    """
    _pixel_count(images)
    scores = _flat_attributions(attributions.detach(), images).to(images.device)
    # A stable sort keeps equal scores in index order: the documented tie-break.
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    return _deletion_probabilities(model, images, targets, order, steps, baseline, batch_size)


def _auc(fractions: torch.Tensor, probabilities: torch.Tensor) -> torch.Tensor:
    return torch.trapezoid(probabilities, fractions.to(probabilities), dim=-1)


def deletion_auc(
    model: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    attributions: torch.Tensor,
    steps: int = 20,
    baseline: Baseline = 0.0,
    batch_size: int = 64,
) -> torch.Tensor:
    """Area under :func:`deletion_curve` over the removed fraction in [0, 1]; lower is more faithful.

    Args: as :func:`deletion_curve`.

    Returns:
        ``(B,)`` trapezoidal area, between 0 and 1.
    """
    fractions, probabilities = deletion_curve(
        model, images, targets, attributions, steps, baseline, batch_size
    )
    return _auc(fractions, probabilities)


def random_deletion_auc(
    model: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    steps: int = 20,
    baseline: Baseline = 0.0,
    generator: torch.Generator | None = None,
    repeats: int = 1,
    batch_size: int = 64,
) -> torch.Tensor:
    """Deletion AUC of a uniformly random pixel order: the chance level a method must beat.

    Args:
        model, images, targets, steps, baseline, batch_size: as :func:`deletion_curve`.
        generator: CPU generator for the pixel orders; ``None`` draws from the global RNG.
        repeats: independent random orders per image, averaged.

    Returns:
        ``(B,)`` mean area under the random-order deletion curve.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    pixels = _pixel_count(images)
    total = torch.zeros(images.shape[0], dtype=torch.float32, device=images.device)
    for _ in range(repeats):
        # Drawn on the CPU so a CPU generator gives the same orders whatever the model's device.
        noise = torch.rand(images.shape[0], pixels, generator=generator)
        order = noise.argsort(dim=1).to(images.device)
        fractions, probabilities = _deletion_probabilities(
            model, images, targets, order, steps, baseline, batch_size
        )
        total += _auc(fractions, probabilities)
    return total / repeats
