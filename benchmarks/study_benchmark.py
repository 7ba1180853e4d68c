"""Benchmark: reproduce the study's table on the patient-grouped split, and measure speed.

Prints (and writes to --out as benchmark.md and benchmark.json):
  1. building the decoded-image cache for every image at 128x128, from a cold cache folder;
  2. cached loading alone (images/s of one pass over the training DataLoader) against training;
  3. training throughput of the LightningModule against a plain PyTorch loop over the same model
     and the same batches, alternated and repeated, as a ratio;
  4. both study presets trained for the full 15 epochs, tested on the patient-grouped test split,
     beside the study's reported numbers, with the wall time.

    python benchmarks/study_benchmark.py                       # CPU, everything (~25 min here)
    python benchmarks/study_benchmark.py --trainer gpu         # one GPU, bf16 mixed precision
    python benchmarks/study_benchmark.py --skip-training       # parts 1-3 only

This is a measurement, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from itertools import islice
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from pneumonia.data.cache import build_or_load
from pneumonia.data.discovery import discover_images
from pneumonia.model.classifier import _fused_step
from pneumonia.training.run import run

ROOT = Path(__file__).resolve().parents[1]
STUDY = {  # the report's test-split figures (per-image split), in %
    "study_unweighted": {
        "balanced_accuracy": 94.9,
        "precision": 97.7,
        "recall": 96.3,
        "specificity": 90.0,
    },
    "study_weighted": {
        "balanced_accuracy": 90.7,
        "precision": 92.0,
        "recall": 99.2,
        "specificity": 98.1,
    },
}
COLUMNS = ("balanced_accuracy", "precision", "recall", "specificity", "auroc")


def load_config(overrides: list[str]) -> DictConfig:
    os.environ.setdefault("PNEUMONIA_ROOT", str(ROOT))
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=overrides)


def bench_cache(cfg: DictConfig) -> dict:
    paths = [img.path for img in discover_images(cfg.data.root)]
    with tempfile.TemporaryDirectory() as cold:
        start = time.perf_counter()
        build_or_load(paths, 128, cold, progress=False)
        seconds = time.perf_counter() - start
    originals = ROOT.parent / "shared" / "data" / "originals"
    result = {"images": len(paths), "cache_build_s": seconds}
    if originals.is_dir():
        big = [img.path for img in discover_images(originals)]
        with tempfile.TemporaryDirectory() as cold:
            start = time.perf_counter()
            build_or_load(big, 128, cold, progress=False)
            result["full_size_ms_per_image"] = 1000 * (time.perf_counter() - start) / len(big)
            result["full_size_images"] = len(big)
    return result


class _EpochTimer(Callback):
    def on_train_epoch_start(self, trainer, pl_module) -> None:
        _sync(pl_module.device)
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        _sync(pl_module.device)
        self.seconds = time.perf_counter() - self.start


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_throughput(cfg: DictConfig, n_batches: int, repeats: int) -> dict:
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()

    start = time.perf_counter()
    seen = sum(len(y) for _, y in loader)
    loader_rate = seen / (time.perf_counter() - start)

    accelerator = cfg.trainer.accelerator
    device = torch.device("cuda" if accelerator == "gpu" else "cpu")
    # Both loops get the same batches already on the device, as training runs get them there
    # (data.batches_on_device): the ratio is the framework's overhead, not the data path's.
    batches = [(x.to(device), y.to(device)) for x, y in islice(loader, n_batches)]
    images = sum(len(y) for _, y in batches)
    bf16 = str(cfg.trainer.precision).startswith("bf16")

    def fresh_module():
        L.seed_everything(0, verbose=False)
        module = instantiate(cfg.model, optimizer=cfg.optimizer, _recursive_=False)
        module.hparams.class_weights = [float(w) for w in datamodule.class_weights]
        module.hparams.pixel_mean, module.hparams.pixel_std = (
            datamodule.pixel_mean,
            datamodule.pixel_std,
        )
        return module

    def plain() -> float:
        module = fresh_module().to(device)
        module.train()
        # The step the LightningModule takes (fused Adam where it can): the ratio then measures
        # the framework, not two different optimizer kernels.
        parameters = list(module.parameters())
        optimizer = instantiate(
            cfg.optimizer, params=parameters, **_fused_step(cfg.optimizer, parameters)
        )
        weights = torch.tensor(module.hparams.class_weights, device=device)
        _sync(device)
        start = time.perf_counter()
        for x, y in batches:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = module.net(module.preprocess(x))
            loss = F.binary_cross_entropy_with_logits(logits.float(), y, weight=weights[y.long()])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        _sync(device)
        return images / (time.perf_counter() - start)

    def lightning() -> float:
        module = fresh_module()
        timer = _EpochTimer()
        trainer = L.Trainer(
            accelerator=accelerator,
            devices=1,
            precision=cfg.trainer.precision,
            max_epochs=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            callbacks=[timer],
        )
        trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
        return images / timer.seconds

    plain(), lightning()  # warm-up: allocator, oneDNN/cuDNN kernel selection
    rates = {"plain": [], "lightning": []}
    for repeat in range(repeats):
        # Alternate which goes first, so drift (allocator state, other load) hits both alike.
        order = (("plain", plain), ("lightning", lightning))
        for name, measure in order if repeat % 2 == 0 else order[::-1]:
            rates[name].append(measure())
    plain_rate = statistics.median(rates["plain"])
    lightning_rate = statistics.median(rates["lightning"])
    return {
        "batches": len(batches),
        "batch_size": cfg.data.batch_size,
        "repeats": repeats,
        "plain_img_per_s": plain_rate,
        "lightning_img_per_s": lightning_rate,
        "lightning_over_plain": lightning_rate / plain_rate,
        "all_rates": rates,
        "loader_img_per_s": loader_rate,
        "loader_share_of_step": lightning_rate / loader_rate,
    }


def bench_study(preset: str, base: list[str], out: Path, epochs: int) -> dict:
    run_dir = out / preset
    cfg = load_config(
        [
            *base,
            f"experiment={preset}",
            f"paths.output_dir={run_dir}",
            f"trainer.max_epochs={epochs}",
        ]
    )
    start = time.perf_counter()
    run(cfg)
    seconds = time.perf_counter() - start
    report = json.loads((run_dir / "test_metrics.json").read_text())
    result = {"wall_s": seconds, "epochs": epochs, **report}
    timings = run_dir / "explanations" / "timings.json"
    if timings.is_file():  # the attribution-map callback's cost against an epoch's
        callback_s = json.loads(timings.read_text())["seconds"]
        epoch_s = (seconds - sum(callback_s)) / epochs
        result["callback_s_mean"] = statistics.mean(callback_s)
        result["callback_share_of_epoch"] = result["callback_s_mean"] / epoch_s
    return result


def markdown(results: dict) -> str:
    lines = [f"machine: {results['machine']}", ""]
    if "cache" in results:
        c = results["cache"]
        lines.append(
            f"- cache build, {c['images']} images at 128x128, cold: {c['cache_build_s']:.1f} s"
        )
        if "full_size_ms_per_image" in c:
            lines.append(
                f"- decoding full-size originals ({c['full_size_images']} images, 527x219..2172x1963): "
                f"{c['full_size_ms_per_image']:.1f} ms per image"
            )
    if "throughput" in results:
        t = results["throughput"]
        lines += [
            f"- training throughput over the same {t['batches']} batches of {t['batch_size']}, median of {t['repeats']}: "
            f"plain loop {t['plain_img_per_s']:.0f} img/s, LightningModule {t['lightning_img_per_s']:.0f} img/s, "
            f"ratio {t['lightning_over_plain']:.3f}",
            f"- cached loading alone: {t['loader_img_per_s']:.0f} img/s, "
            f"{t['loader_img_per_s'] / t['lightning_img_per_s']:.0f}x the training rate "
            f"(loading is {100 * t['loader_share_of_step']:.1f}% of a training step's time)",
        ]
    if "study" in results:
        lines += [
            "",
            "| model | split | balanced accuracy | precision | recall | specificity | AUROC | wall time |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for preset, res in results["study"].items():
            s = STUDY[preset]
            lines.append(
                f"| {preset}, study report | per image | {s['balanced_accuracy']:.1f}% | {s['precision']:.1f}% | "
                f"{s['recall']:.1f}% | {s['specificity']:.1f}% | n/a | n/a |"
            )
            m = res["metrics"]
            lines.append(
                f"| {preset}, this run | by patient ({res['images']} test images) | "
                + " | ".join(
                    f"{100 * m[k]:.1f}%" if k != "auroc" else f"{m[k]:.3f}" for k in COLUMNS
                )
                + f" | {res['wall_s'] / 60:.1f} min ({res['epochs']} epochs) |"
            )
        callbacks = [r for r in results["study"].values() if "callback_s_mean" in r]
        if callbacks:
            lines.append("")
            lines += [
                f"- Guided Grad-CAM callback ({preset}): {r['callback_s_mean']:.2f} s per validation epoch, "
                f"{100 * r['callback_share_of_epoch']:.1f}% of an epoch"
                for preset, r in results["study"].items()
                if "callback_s_mean" in r
            ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--trainer", default="cpu", help="trainer config: cpu or gpu (bf16 mixed precision)"
    )
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument(
        "--batches", type=int, default=40, help="batches per throughput measurement"
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--skip-cache", action="store_true", help="do not time a cold cache build first"
    )
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / "outputs" / "benchmarks" / time.strftime("%Y-%m-%d_%H-%M-%S"),
    )
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides, e.g. data.root=...")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    base = [f"trainer={args.trainer}", *args.overrides]
    cfg = load_config([*base, "paths.output_dir=" + str(args.out / "throughput")])
    device = (
        torch.cuda.get_device_name() if args.trainer == "gpu" else f"{os.cpu_count()} CPU cores"
    )
    results: dict = {
        "machine": f"{platform.node()}, {device}, torch {torch.__version__}, lightning {L.__version__}, "
        f"precision {cfg.trainer.precision}",
    }
    if not args.skip_cache:
        results["cache"] = bench_cache(cfg)
        print(markdown(results), flush=True)
    if not args.skip_throughput:
        results["throughput"] = bench_throughput(cfg, args.batches, args.repeats)
        print(markdown(results), flush=True)
    if not args.skip_training:
        results["study"] = {p: bench_study(p, base, args.out, args.epochs) for p in STUDY}
    text = markdown(results)
    (args.out / "benchmark.md").write_text(text + "\n")
    (args.out / "benchmark.json").write_text(json.dumps(results, indent=2) + "\n")
    print("\n" + text + f"\n\nwritten to {args.out}")


if __name__ == "__main__":
    main()
