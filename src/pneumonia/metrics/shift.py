"""Shift suite: a classifier's metrics on the test split under controlled image perturbations.

A model that holds up only on images exactly like its training pool is fragile; this suite
re-evaluates it on the same images after nine perturbations, each at three severities, and sums
the damage up in one robustness score: the mean balanced accuracy over every perturbed set (the
threshold stays the one chosen on validation; balanced accuracy is defined even when a split holds
one class, where AUROC is not).

Severity 1 is mild (a radiologist would still call it the same image quality); severity 3 is
strong but leaves a readable X-ray. Every perturbation maps uint8 ``(B, 1, H, W)`` to uint8 of the
same shape, rounding and clipping to [0, 255]; "full scale" is 255 grey levels.

================  ==========================================================  ======  ======  ======
perturbation      what it does                                                1       2       3
================  ==========================================================  ======  ======  ======
``contrast``      scales the deviation from each image's mean by a factor     0.8     0.6     0.4
``gamma``         ``255 * (x / 255) ** gamma``; darkens mid-greys only        1.3     1.7     2.2
``brightness``    adds a share of full scale (+20.4, +40.8, +61.2 levels)     +0.08   +0.16   +0.24
``blur``          Gaussian blur, sigma in px at 128 px, scaled with the side  0.5     1.0     2.0
``noise``         additive Gaussian noise, std as a share of full scale       0.02    0.05    0.10
``downscale``     area downsampling by a factor, bilinear back up             2       3       4
``jpeg``          JPEG round trip at a quality                                50      25      10
``zoom``          central crop of side / factor, bilinear back up (zoom in)   1.1     1.25    1.5
``rotation``      counter-clockwise rotation in degrees, black corners        5       10      20
================  ==========================================================  ======  ======  ======

Directions are fixed rather than alternating, so a severity curve measures one kind of damage:
gamma only darkens (an under-exposed film), brightness only lightens (a washed-out one), zoom only
zooms in (a tighter collimation), rotation only turns counter-clockwise. The parameters live in
:data:`SEVERITY_PARAMETERS`.

Only ``noise`` consumes its generator; it draws each image's noise with its own call, so an image's
noise depends on its position in the set but not on how the set is cut into batches.
:func:`run_shift_suite` seeds one generator per (perturbation, severity) from the suite's seed, so a
result is reproducible and does not depend on which other perturbations run or on ``batch_size``.
"""

from __future__ import annotations

import csv
import logging
import math
import operator
import warnings
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torchvision.io import ImageReadMode, decode_jpeg, encode_jpeg
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF
from tqdm.auto import tqdm

from pneumonia.errors import NonFiniteOutputError
from pneumonia.files import written_aside
from pneumonia.metrics.diagnostic import METRIC_NAMES, DiagnosticMetrics

log = logging.getLogger(__name__)

#: ``(images uint8 (B, 1, H, W), severity in 1..3, generator) -> uint8 (B, 1, H, W)``.
Perturbation = Callable[[torch.Tensor, int, torch.Generator], torch.Tensor]

SEVERITIES: tuple[int, ...] = (1, 2, 3)

#: The parameter of each perturbation at severities 1, 2 and 3 (see the module's table).
SEVERITY_PARAMETERS: dict[str, tuple[float, float, float]] = {
    "contrast": (0.8, 0.6, 0.4),  # factor on the deviation from the image mean
    "gamma": (1.3, 1.7, 2.2),  # exponent on intensities in [0, 1]
    "brightness": (0.08, 0.16, 0.24),  # offset, share of full scale
    "blur": (0.5, 1.0, 2.0),  # Gaussian sigma in px at a 128 px side
    "noise": (0.02, 0.05, 0.10),  # Gaussian std, share of full scale
    "downscale": (2, 3, 4),  # downsampling factor
    "jpeg": (50, 25, 10),  # JPEG quality
    "zoom": (1.1, 1.25, 1.5),  # zoom-in factor
    "rotation": (5, 10, 20),  # degrees, counter-clockwise
}

_REFERENCE_SIDE = 128  # the side at which the blur sigmas are stated


def _parameter(name: str, images: torch.Tensor, severity: int) -> float:
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
        got = (
            f"{images.dtype} of shape {tuple(images.shape)}"
            if isinstance(images, torch.Tensor)
            else type(images).__name__
        )
        raise ValueError(f"{name}: expected a uint8 tensor (B, 1, H, W), got {got}")
    return SEVERITY_PARAMETERS[name][_check_severity(severity) - 1]


def _check_severity(severity: int) -> int:
    try:
        value = None if isinstance(severity, bool) else operator.index(severity)
    except TypeError:
        value = None
    if value not in SEVERITIES:
        raise ValueError(f"unknown severity {severity!r}; valid severities: {list(SEVERITIES)}")
    return value


def _to_uint8(values: torch.Tensor) -> torch.Tensor:
    return values.round().clamp(0, 255).to(torch.uint8)


def contrast(images: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Scales each image's deviation from its own mean: a flatter, greyer film; a constant stays put."""
    factor = _parameter("contrast", images, severity)
    values = images.float()
    mean = values.mean(dim=(1, 2, 3), keepdim=True)
    return _to_uint8(mean + factor * (values - mean))


def gamma(images: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Gamma above 1: mid-greys darken, black and white stay."""
    exponent = _parameter("gamma", images, severity)
    return _to_uint8(255.0 * (images.float() / 255.0).pow(exponent))


def brightness(images: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Adds a constant share of full scale (saturating at white)."""
    offset = _parameter("brightness", images, severity)
    return _to_uint8(images.float() + 255.0 * offset)


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, math.ceil(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return kernel / kernel.sum()


def blur(images: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Separable Gaussian blur with edge replication; sigma scales with the side relative to 128 px."""
    base = _parameter("blur", images, severity)
    height, width = images.shape[-2:]
    values = images.float()
    batch, channels = values.shape[:2]
    values = values.reshape(batch * channels, 1, height, width)
    for axis, side in ((2, height), (3, width)):
        kernel = _gaussian_kernel(base * side / _REFERENCE_SIDE)
        radius = kernel.numel() // 2
        if axis == 2:
            weight, padding = kernel.view(1, 1, -1, 1), (0, 0, radius, radius)
        else:
            weight, padding = kernel.view(1, 1, 1, -1), (radius, radius, 0, 0)
        values = F.conv2d(F.pad(values, padding, mode="replicate"), weight)
    return _to_uint8(values.reshape(batch, channels, height, width))


def noise(images: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Additive Gaussian noise; each image's draw is its own call on ``generator``, in batch order."""
    std = _parameter("noise", images, severity)
    if images.shape[0] == 0:
        return images.clone()
    draws = torch.stack(
        [torch.randn(images.shape[1:], generator=generator) for _ in range(images.shape[0])]
    )
    return _to_uint8(images.float() + 255.0 * std * draws)


def downscale(images: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Area-averages down by a factor and brings back up bilinearly: detail finer than the factor goes."""
    factor = _parameter("downscale", images, severity)
    height, width = images.shape[-2:]
    small = F.interpolate(
        images.float(),
        size=(max(1, round(height / factor)), max(1, round(width / factor))),
        mode="area",
    )
    return _to_uint8(
        F.interpolate(small, size=(height, width), mode="bilinear", align_corners=False)
    )


def jpeg(images: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Round trip through a grayscale JPEG at a quality (torchvision.io, libjpeg)."""
    quality = int(_parameter("jpeg", images, severity))
    if images.shape[0] == 0:
        return images.clone()
    # torchvision 0.29 deprecates its image codecs in favour of TorchCodec (which has no JPEG
    # encoder for single images here); they work, and the warning says nothing about our use.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        encoded = encode_jpeg([image.contiguous() for image in images], quality=quality)
        decoded = decode_jpeg(encoded, mode=ImageReadMode.GRAY)
    return torch.stack(decoded)


def zoom(images: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Crops the central ``side / factor`` and resizes it back bilinearly: the anatomy looks bigger."""
    factor = _parameter("zoom", images, severity)
    height, width = images.shape[-2:]
    crop_height, crop_width = max(1, round(height / factor)), max(1, round(width / factor))
    top, left = (height - crop_height) // 2, (width - crop_width) // 2
    crop = images[..., top : top + crop_height, left : left + crop_width].float()
    return _to_uint8(
        F.interpolate(crop, size=(height, width), mode="bilinear", align_corners=False)
    )


def rotation(images: torch.Tensor, severity: int, generator: torch.Generator) -> torch.Tensor:
    """Rotates counter-clockwise about the centre (bilinear), filling the corners with black."""
    degrees = _parameter("rotation", images, severity)
    rotated = TF.rotate(
        images.float(), float(degrees), interpolation=InterpolationMode.BILINEAR, fill=0.0
    )
    return _to_uint8(rotated)


#: Every perturbation by name, in the suite's order.
PERTURBATIONS: dict[str, Perturbation] = {
    "contrast": contrast,
    "gamma": gamma,
    "brightness": brightness,
    "blur": blur,
    "noise": noise,
    "downscale": downscale,
    "jpeg": jpeg,
    "zoom": zoom,
    "rotation": rotation,
}


def _json_number(value: float) -> float | None:
    return None if math.isnan(value) else value


@dataclass
class ShiftSuiteResult:
    """Metrics on the clean images and on every (perturbation, severity) set.

    Attributes:
        clean: ``METRIC_NAMES`` on the unperturbed images.
        rows: one per (perturbation, severity), in suite order:
            ``{"perturbation": str, "severity": int, **metrics}``.
        threshold: probability at or above which a prediction was PNEUMONIA.
        score: robustness score, the mean balanced accuracy over all perturbed sets.
        unchanged: the sets (``"blur 1"``) whose perturbation left every image as it was: a blur
            of under a pixel at a small image size rounds away. They score as clean.
    """

    clean: dict[str, float]
    rows: list[dict] = field(default_factory=list)
    threshold: float = 0.5
    score: float = float("nan")
    unchanged: list[str] = field(default_factory=list)

    @property
    def perturbations(self) -> list[str]:
        """The perturbations in the rows, in order of first appearance."""
        return list(dict.fromkeys(row["perturbation"] for row in self.rows))

    @property
    def severities(self) -> list[int]:
        """The severities in the rows, ascending."""
        return sorted({int(row["severity"]) for row in self.rows})

    def to_csv(self, path: str | Path) -> Path:
        """Writes one line per set, the clean one first (perturbation ``clean``, severity 0)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        columns = ["perturbation", "severity", *METRIC_NAMES]
        with written_aside(path) as partial, partial.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerow({"perturbation": "clean", "severity": 0, **self.clean})
            for row in self.rows:
                writer.writerow({column: row[column] for column in columns})
        return path

    def to_markdown(self) -> str:
        """Balanced accuracy per perturbation (rows) and severity (columns), and the score."""
        severities = self.severities
        by_set = {(row["perturbation"], int(row["severity"])): row for row in self.rows}
        clean = self.clean["balanced_accuracy"]
        header = ["perturbation", "clean", *(f"severity {s}" for s in severities), "mean"]
        lines = [
            "| " + " | ".join(header) + " |",
            "|" + "|".join([":---", *["---:"] * (len(header) - 1)]) + "|",
        ]
        for name in self.perturbations:
            values = [
                by_set[name, s]["balanced_accuracy"] if (name, s) in by_set else None
                for s in severities
            ]
            present = [v for v in values if v is not None]
            mean = sum(present) / len(present)
            cells = ["–" if v is None else f"{v:.3f}" for v in values]
            lines.append(f"| {name} | {clean:.3f} | " + " | ".join(cells) + f" | {mean:.3f} |")
        lines += [
            "",
            f"Balanced accuracy at threshold {self.threshold:.3f}. Robustness score (mean balanced "
            f"accuracy over {len(self.rows)} perturbed sets): **{self.score:.3f}** "
            f"(clean: {clean:.3f}, change {self.score - clean:+.3f}).",
        ]
        if self.unchanged:
            lines.append(
                f"Left every image unchanged at this image size, so scored as clean: "
                f"{', '.join(self.unchanged)}."
            )
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict:
        """JSON-serialisable: plain floats and ints, NaN (an undefined AUROC) as ``None``."""
        return {
            "threshold": float(self.threshold),
            "score": _json_number(float(self.score)),
            "clean": {name: _json_number(float(value)) for name, value in self.clean.items()},
            "rows": [
                {
                    key: _json_number(float(value)) if key in METRIC_NAMES else value
                    for key, value in row.items()
                }
                for row in self.rows
            ],
            "unchanged": list(self.unchanged),
        }


def _set_seed(seed: int, name: str, severity: int) -> int:
    # zlib.crc32, not hash(): Python salts string hashes per process.
    return zlib.crc32(f"{seed}/{name}/{severity}".encode()) & 0x7FFF_FFFF_FFFF_FFFF


def _validate(perturbations: Sequence[str], severities: Sequence[int]) -> None:
    if isinstance(perturbations, str):
        raise ValueError(
            f"perturbations must be a sequence of names, got the string {perturbations!r}"
        )
    if not perturbations:
        raise ValueError(f"no perturbation selected; valid perturbations: {list(PERTURBATIONS)}")
    for name in perturbations:
        if name not in PERTURBATIONS:
            raise ValueError(
                f"unknown perturbation {name!r}; valid perturbations: {list(PERTURBATIONS)}"
            )
    if not severities:
        raise ValueError(f"no severity selected; valid severities: {list(SEVERITIES)}")
    for severity in severities:
        _check_severity(severity)


def run_shift_suite(
    predict: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    labels: torch.Tensor,
    threshold: float,
    *,
    perturbations: Sequence[str] | None = None,
    severities: Sequence[int] = SEVERITIES,
    batch_size: int = 256,
    seed: int = 0,
    progress: bool = True,
) -> ShiftSuiteResult:
    """Evaluates ``predict`` on ``images`` clean and under every (perturbation, severity).

    Args:
        predict: maps a uint8 ``(b, 1, H, W)`` CPU batch to P(PNEUMONIA) ``(b,)``.
        images: uint8 ``(N, 1, H, W)``; perturbed ``batch_size`` images at a time, on CPU.
        labels: ``(N,)`` in {0, 1}; PNEUMONIA is 1.
        threshold: probability at or above which a prediction is PNEUMONIA.
        perturbations: names from :data:`PERTURBATIONS`; all of them, in order, by default.
        severities: each in 1..3.
        batch_size: images per ``predict`` call; the result does not depend on it.
        seed: seeds one generator per (perturbation, severity).
        progress: show one tqdm bar over all sets.

    Raises:
        ValueError: an unknown perturbation or severity, or mismatched ``images`` and ``labels``.
        pneumonia.errors.NonFiniteOutputError: ``predict`` returned NaN or infinity on a set.
    """
    names = list(PERTURBATIONS) if perturbations is None else list(perturbations)
    _validate(names, list(severities))
    # Repeats would only repeat rows (and weigh them twice in the score).
    names = list(dict.fromkeys(names))
    severities = list(dict.fromkeys(_check_severity(s) for s in severities))
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 1:
        raise ValueError(
            f"images must be uint8 (N, 1, H, W), got {images.dtype} {tuple(images.shape)}"
        )
    labels = torch.as_tensor(labels).reshape(-1).long().cpu()
    if labels.numel() != images.shape[0] or images.shape[0] == 0:
        raise ValueError(
            f"need one label per image and at least one image: {images.shape[0]} images, "
            f"{labels.numel()} labels"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")

    starts = range(0, images.shape[0], batch_size)
    sets: list[tuple[str, int]] = [("clean", 0)] + [(n, s) for n in names for s in severities]
    bar = tqdm(
        total=len(sets) * len(starts), desc="shift suite", unit="batch", disable=not progress
    )
    results: list[dict[str, float]] = []
    unchanged: list[str] = []
    with bar, torch.no_grad():
        for name, severity in sets:
            label = "clean" if name == "clean" else f"{name} {severity}"
            bar.set_postfix_str(label)
            generator = torch.Generator().manual_seed(_set_seed(seed, name, severity))
            metrics = DiagnosticMetrics(threshold)
            changed = name == "clean"
            for start in starts:
                batch = images[start : start + batch_size].cpu()
                if name != "clean":
                    perturbed = PERTURBATIONS[name](batch, severity, generator)
                    changed = changed or not torch.equal(perturbed, batch)
                    batch = perturbed
                probabilities = torch.as_tensor(predict(batch)).detach().double().cpu().reshape(-1)
                if probabilities.numel() != batch.shape[0]:
                    raise ValueError(
                        f"predict returned {probabilities.numel()} probabilities for a batch of "
                        f"{batch.shape[0]} images"
                    )
                if not bool(probabilities.isfinite().all()):
                    # A NaN is never >= the threshold: it would count as a NORMAL call.
                    raise NonFiniteOutputError(
                        f"the model's outputs on the shift suite's {label} set are not "
                        "finite (the network overflows on these images): its metrics would "
                        "mean nothing, so the suite stops instead of counting them as NORMAL"
                    )
                metrics.update(probabilities, labels[start : start + batch_size])
                bar.update()
            results.append({key: float(value) for key, value in metrics.compute().items()})
            if not changed:
                unchanged.append(label)

    rows = [
        {"perturbation": name, "severity": severity, **values}
        for (name, severity), values in zip(sets[1:], results[1:], strict=True)
    ]
    score = sum(row["balanced_accuracy"] for row in rows) / len(rows)
    if unchanged:
        log.warning(
            "the shift suite's %s left every %dx%d image unchanged (a blur under a pixel at this "
            "size rounds away): those sets score as clean, which raises shift/robustness against "
            "runs at larger image sizes",
            ", ".join(unchanged),
            *images.shape[-2:],
        )
    return ShiftSuiteResult(
        clean=results[0], rows=rows, threshold=float(threshold), score=score, unchanged=unchanged
    )


def shift_suite_figure(result: ShiftSuiteResult, metric: str = "balanced_accuracy") -> Figure:
    """``metric`` against severity (0 = clean) with one line per perturbation; the score in the title."""
    if metric not in METRIC_NAMES:
        raise ValueError(f"unknown metric {metric!r}; valid metrics: {list(METRIC_NAMES)}")
    # A bare Figure, not pyplot: no global state, and it renders with Agg wherever it is saved.
    fig = Figure(figsize=(7.0, 4.2), dpi=100)
    ax = fig.subplots()
    markers = "osD^v<>pXh*"
    severities = result.severities
    for i, name in enumerate(result.perturbations):
        points = sorted(
            (int(row["severity"]), row[metric])
            for row in result.rows
            if row["perturbation"] == name
        )
        xs = [0] + [s for s, _ in points]
        ys = [result.clean[metric]] + [v for _, v in points]
        ax.plot(xs, ys, marker=markers[i % len(markers)], label=name)
    ax.axhline(result.clean[metric], color="grey", linestyle=":", linewidth=1, label="clean")
    ax.set_xticks([0, *severities], labels=["clean", *(str(s) for s in severities)])
    ax.set_xlabel("severity")
    ax.set_ylabel(metric.replace("_", " "))
    ax.set_title(
        f"Shift suite: {metric.replace('_', ' ')} by severity\n"
        f"robustness score {result.score:.3f} (clean {result.clean['balanced_accuracy']:.3f})"
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize="small")
    fig.tight_layout()
    return fig
