"""Benchmark: Guided Grad-CAM throughput (images/s) of the study CNN at 128 px.

Times the one-forward implementation the package uses (``pneumonia.explain.methods.guided_gradcam``)
against Captum's two-pass ``GuidedGradCam`` (LeakyReLU guided, the reference it is tested against),
over several batch sizes, on the first ``--images`` real X-rays found, through ``explain()`` (as
``explain.py`` and the callback: class scores, the predicted class, then the maps).

    python benchmarks/explain_benchmark.py                  # CPU
    python benchmarks/explain_benchmark.py --device cuda    # one GPU

Goals (issue 9): >= 100 images/s on the 2-core CPU, >= 1,000 on one GPU. This is a measurement,
not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from pneumonia.data.cache import build_or_load
from pneumonia.data.discovery import discover_images
from pneumonia.explain.methods import ClassScores, attribution_fn, explain
from pneumonia.explain.methods import guided_gradcam as fused_module
from pneumonia.explain.methods.common import find_layer
from pneumonia.model.classifier import XrayClassifier

ROOT = Path(__file__).resolve().parents[1]


def captum_guided_gradcam(model, images, targets, layer, interpolate_mode):
    """Captum's two-pass GuidedGradCam (LeakyReLU guided): the reference implementation."""
    explainer = fused_module.LeakyGuidedGradCam(model, find_layer(model, layer))
    return explainer.attribute(images, target=targets, interpolate_mode=interpolate_mode)


def load_images(count: int, size: int) -> torch.Tensor:
    root = Path(os.environ.get("PNEUMONIA_DATA", ROOT / "data" / "chest_xray"))
    paths = [image.path for image in discover_images(root)][:count]
    cache = build_or_load(paths, size, ROOT / "data" / "cache", progress=False)
    return torch.from_numpy(cache.pixels[: len(paths)].copy()).unsqueeze(1).float() / 255.0


def rate(model, images, method, batch_size, device, repeats) -> float:
    def one_pass() -> None:
        for batch in images.split(batch_size):
            explain(model, batch, method)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    one_pass()  # warm-up: kernel selection, allocator
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        one_pass()
        best = max(best, len(images) / (time.perf_counter() - start))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch-sizes", default="8,16,32,128")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="write explain_benchmark.json here")
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(0)
    net = {"_target_": "pneumonia.model.study_cnn.StudyCNN", "image_size": args.size}
    classifier = XrayClassifier(
        net=net, optimizer={"_target_": "torch.optim.Adam"}, image_size=args.size
    )
    model = ClassScores(classifier.to(device))
    images = load_images(args.images, args.size).to(device)
    implementations = {
        "one_forward (package)": attribution_fn("guided_gradcam"),
        "captum_two_pass": _with_implementation(captum_guided_gradcam),
    }
    results = {
        "device": str(device),
        "machine": _machine(device),
        "images": len(images),
        "rates": {},
    }
    print(
        f"Guided Grad-CAM, study CNN at {args.size} px, {len(images)} real X-rays, {results['machine']}"
    )
    for name, method in implementations.items():
        for batch_size in (int(b) for b in args.batch_sizes.split(",")):
            value = rate(model, images, method, batch_size, device, args.repeats)
            results["rates"][f"{name}@{batch_size}"] = value
            print(f"  {name:<22} batch {batch_size:>4}: {value:8.0f} images/s")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "explain_benchmark.json").write_text(json.dumps(results, indent=2))


def _with_implementation(implementation):
    """An AttributionFn around another guided_gradcam implementation (same modes and clones)."""
    from pneumonia.explain.methods import registry

    original = registry.IMPLEMENTATIONS["guided_gradcam"]
    registry.IMPLEMENTATIONS["guided_gradcam"] = implementation
    try:
        return registry.attribution_fn("guided_gradcam")
    finally:
        registry.IMPLEMENTATIONS["guided_gradcam"] = original


def _machine(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


if __name__ == "__main__":
    main()
