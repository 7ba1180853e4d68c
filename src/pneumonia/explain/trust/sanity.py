"""Model-parameter randomisation test of Adebayo et al. 2018, "Sanity Checks for Saliency Maps".

An explanation of a model should depend on what the model learned. The cascading test re-initialises
the layers of a copy of the model one after another, from the output towards the input, and after
each step compares the new attribution maps with those of the trained model by Spearman rank
correlation. A method whose maps stay highly correlated while the weights are destroyed is showing
something else, typically the input's own edges, and fails the check.

Shapes: images ``(B, 1, H, W)``, targets ``(B,)``, attributions ``(B, 1, H, W)``.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from pneumonia.explain.methods.registry import AttributionFn


@dataclass(frozen=True)
class RandomizationStep:
    """One step of the cascade.

    Attributes:
        layer: dotted name of the layer re-initialised at this step (those of earlier steps stay
            randomised too).
        mean_rank_correlation: mean of ``rank_correlations`` over the images.
        rank_correlations: ``(B,)`` Spearman correlation of each image's map with its reference map.
    """

    layer: str
    mean_rank_correlation: float
    rank_correlations: torch.Tensor


def _average_ranks(values: torch.Tensor) -> torch.Tensor:
    """``(B, N)`` ranks 0..N-1 along dim 1, ties sharing the mean of their positions (float64)."""
    batch, count = values.shape
    sorted_values, order = torch.sort(values, dim=1, stable=True)
    starts_group = torch.ones_like(sorted_values, dtype=torch.bool)
    starts_group[:, 1:] = sorted_values[:, 1:] != sorted_values[:, :-1]
    # Group ids are offset per row so one scatter handles the whole batch.
    groups = starts_group.long().cumsum(dim=1) - 1
    groups = groups + torch.arange(batch, device=values.device)[:, None] * count
    positions = torch.arange(count, device=values.device, dtype=torch.float64).expand(batch, count)
    flat_groups = groups.reshape(-1)
    sums = torch.zeros(batch * count, dtype=torch.float64, device=values.device)
    sums.scatter_add_(0, flat_groups, positions.reshape(-1))
    sizes = torch.zeros_like(sums).scatter_add_(0, flat_groups, torch.ones_like(sums))
    mean_positions = sums / sizes.clamp(min=1)
    sorted_ranks = mean_positions[flat_groups].view(batch, count)
    return torch.empty_like(sorted_ranks).scatter_(1, order, sorted_ranks)


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample Spearman rank correlation of two batches of maps.

    Ties get average ranks, so a map against itself gives exactly 1 and against its negation -1.
    A constant map has no ranking to correlate, and gives 0 rather than NaN.

    Args:
        a: ``(B, ...)`` maps; everything after the batch dimension is flattened.
        b: ``(B, ...)`` maps with as many elements per sample as ``a``.

    Returns:
        ``(B,)`` float64 correlations in [-1, 1].
    """
    if a.shape[0] != b.shape[0] or a[0].numel() != b[0].numel():
        raise ValueError(f"maps of shapes {tuple(a.shape)} and {tuple(b.shape)} cannot be paired")
    ranks_a = _average_ranks(a.detach().reshape(a.shape[0], -1))
    ranks_b = _average_ranks(b.detach().reshape(b.shape[0], -1).to(a.device))
    ranks_a = ranks_a - ranks_a.mean(dim=1, keepdim=True)
    ranks_b = ranks_b - ranks_b.mean(dim=1, keepdim=True)
    covariance = (ranks_a * ranks_b).sum(dim=1)
    scale = torch.sqrt((ranks_a**2).sum(dim=1) * (ranks_b**2).sum(dim=1))
    correlation = torch.where(scale > 0, covariance / scale.clamp(min=1e-300), 0.0)
    # Rounding can push a perfect correlation a hair past 1.
    return correlation.clamp(-1.0, 1.0)


def parameterised_layers(model: nn.Module) -> list[str]:
    """Names of the submodules that directly own parameters (Conv, Linear, norms), in registration
    order. A module that owns parameters itself, the root included (named ``""``), counts."""
    return [
        name
        for name, module in model.named_modules()
        if next(module.parameters(recurse=False), None) is not None
    ]


def _resolve_layers(model: nn.Module, layers: Sequence[str] | None) -> list[str]:
    available = parameterised_layers(model)
    if layers is None:
        # Adebayo et al. cascade from the logits down to the first layer.
        return available[::-1]
    modules = dict(model.named_modules())
    for name in layers:
        if name not in modules or name not in available:
            problem = "is not in the model" if name not in modules else "owns no parameters"
            raise ValueError(f"layer {name!r} {problem}; layers with parameters are {available}")
    return list(layers)


def _check_resettable(modules: dict[str, nn.Module], names: Sequence[str]) -> None:
    # Checked before any map is computed, so a bad layer fails fast rather than mid-cascade.
    for name in names:
        if not callable(getattr(modules[name], "reset_parameters", None)):
            raise TypeError(
                f"layer {name!r} ({type(modules[name]).__name__}) has no reset_parameters(); "
                "pass layers= naming only layers that have one"
            )


def cascading_randomization(
    model: nn.Module,
    attribute_fn: AttributionFn,
    images: torch.Tensor,
    targets: torch.Tensor,
    layers: Sequence[str] | None = None,
    seed: int = 0,
    absolute: bool = True,
    progress: str | None = None,
) -> list[RandomizationStep]:
    """Cascading model-parameter randomisation: how much the maps change as weights are destroyed.

    The model is deep-copied (the caller's model is never modified) and put in eval mode. Reference
    maps come from the trained weights; then layer ``k`` of ``layers`` is re-initialised with its
    ``reset_parameters()`` under ``torch.manual_seed(seed + k)``, on top of the layers before it,
    and the maps are recomputed and compared with the reference. The global RNG state is restored
    afterwards. Norm layers' ``reset_parameters()`` sets them to identity (weight 1, bias 0, fresh
    running statistics) rather than to random values: the learned values are gone either way.

    Args:
        model: class model, ``(B, 1, H, W)`` -> scores ``(B, 2)``.
        attribute_fn: ``(model, images, targets) -> (B, 1, H, W)`` attributions.
        images: ``(B, 1, H, W)`` inputs in [0, 1].
        targets: ``(B,)`` class explained for each image.
        layers: dotted module names, randomised in the given order; ``None`` means every module
            that directly owns parameters, from the last registered to the first (output to input).
        seed: base seed of the re-initialisations.
        absolute: compare ``|maps|``, as the paper does (the sign of many methods is not
            meaningful on its own); ``False`` compares signed maps.
        progress: the label of a progress bar over the layers (DenseNet-121 has 242); ``None``
            shows none.

    Returns:
        One :class:`RandomizationStep` per layer, in randomisation order.

    Raises:
        ValueError: a name in ``layers`` is not a module of ``model`` or owns no parameters.
        TypeError: a layer to randomise has no ``reset_parameters()`` (e.g. a custom module owning
            an ``nn.Parameter``); name the other layers explicitly.
    """
    randomised = copy.deepcopy(model)
    randomised.eval()
    names = _resolve_layers(randomised, layers)
    modules = dict(randomised.named_modules())
    _check_resettable(modules, names)

    def maps() -> torch.Tensor:
        result = attribute_fn(randomised, images, targets).detach()
        return result.abs() if absolute else result

    reference = maps()
    devices = sorted({p.device.index or 0 for p in randomised.parameters() if p.is_cuda})
    steps: list[RandomizationStep] = []
    bar = tqdm(names, desc=progress, unit="layer", leave=False, disable=progress is None)
    for k, name in enumerate(bar):
        # fork_rng keeps the seeding from leaking into the caller's global RNG stream.
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed + k)
            modules[name].reset_parameters()
        correlations = spearman(reference, maps())
        steps.append(
            RandomizationStep(
                layer=name,
                mean_rank_correlation=float(correlations.mean()),
                rank_correlations=correlations.cpu(),
            )
        )
    return steps
