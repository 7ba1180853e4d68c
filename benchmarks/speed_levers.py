"""Benchmark: what each speed lever is worth, as training images/s of the LightningModule.

Trains the study CNN (128 px, batch 32, Adam) for ``--batches`` steps of the real training split
through ``lightning.Trainer`` (validation off), once per variant, alternating and repeated. Each
variant switches one lever back to its old setting, so its rate against the default is that
lever's share:

- CPU: bf16 autocast (``trainer.precision``), the byte-mask dropout (``nn.Dropout`` instead),
  channels-last convolutions, Adam's fused step (the multi-tensor one instead), max-pooling
  before the LeakyReLU (the study's order, activation first, instead);
- GPU: device-held batches (a DataLoader with 4 workers and pinned memory instead), the progress
  bar's refresh rate (every step instead of every 50), bf16 autocast.

    python benchmarks/speed_levers.py                 # CPU
    python benchmarks/speed_levers.py --device cuda   # one GPU

This is a measurement, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from pneumonia.data.datamodule import ChestXrayDataModule
from pneumonia.model.classifier import XrayClassifier
from pneumonia.model.dropout import ByteMaskDropout
from pneumonia.training.precision import cpu_precision
from pneumonia.training.progress import StepProgressBar

ROOT = Path(__file__).resolve().parents[1]
NET = {"_target_": "pneumonia.model.study_cnn.StudyCNN", "image_size": 128}
ADAM = {"_target_": "torch.optim.Adam", "lr": 0.00175, "weight_decay": 1e-4}


class _Timer(Callback):
    """Images/s of the training steps after the first ``skip`` (kernel selection, allocator)."""

    def __init__(self, skip: int = 5) -> None:
        self.skip, self.start, self.images = skip, None, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.skip:
            _sync(pl_module.device)
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx >= self.skip:
            self.images += len(batch[1])

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        _sync(pl_module.device)
        self.rate = self.images / (time.perf_counter() - self.start)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(datamodule, device: str, batches: int, precision: str, *, dropout=True,
            channels_last=True, device_batches=True, refresh_rate=None, fused=True,
            pool_first=True) -> float:  # fmt: skip
    L.seed_everything(0, verbose=False)
    optimizer = ADAM if fused else {**ADAM, "foreach": True}
    module = XrayClassifier(net=NET, optimizer=optimizer, channels_last=channels_last)
    if not pool_first:  # the study's Conv -> LeakyReLU -> MaxPool (the same outputs)
        features = module.net.features
        for block in range(0, len(features), 4):
            features[block + 1], features[block + 2] = features[block + 2], features[block + 1]
    if not dropout:  # the old dropout: torch's bernoulli masks
        for parent in module.net.modules():
            for name, child in parent.named_children():
                if isinstance(child, ByteMaskDropout):
                    setattr(parent, name, nn.Dropout(child.p))
    datamodule.batches_on_device = device_batches if device != "cpu" else False
    datamodule.num_workers = 0 if device_batches or device == "cpu" else 4
    datamodule.pin_memory = device != "cpu" and not device_batches
    timer = _Timer()
    trainer = L.Trainer(
        accelerator="gpu" if device == "cuda" else "cpu",
        devices=1,
        precision=precision,
        # Steps, not one epoch's batches: --batches above one pass (131 at batch 32) is honoured.
        max_epochs=-1,
        max_steps=batches,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        log_every_n_steps=10,
        callbacks=[timer, StepProgressBar(refresh_rate=refresh_rate)],
    )
    trainer.fit(module, datamodule=datamodule)
    return timer.rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.batches <= _Timer().skip:
        parser.error(f"--batches must exceed the {_Timer().skip} warm-up steps")

    root = os.environ.get("PNEUMONIA_DATA", str(ROOT / "data" / "chest_xray"))
    datamodule = ChestXrayDataModule(root, cache_dir=ROOT / "data" / "cache", batch_size=32)
    datamodule.prepare_data()
    datamodule.setup("fit")
    if args.device == "cpu":
        default = cpu_precision()
        # The other precision than this CPU's default: bf16 without native bf16 is emulated.
        other = (
            ("fp32 (no bf16 autocast)", "32-true")
            if default != "32-true"
            else ("bf16 autocast (emulated on this CPU)", "bf16-mixed")
        )
        variants = {
            "default": {"precision": default},
            other[0]: {"precision": other[1]},
            "torch dropout masks": {"precision": default, "dropout": False},
            "no channels-last": {"precision": default, "channels_last": False},
            "multi-tensor Adam step": {"precision": default, "fused": False},
            "activation before pooling": {"precision": default, "pool_first": False},
            "before issue 9 (all five; fp32)": {
                "precision": "32-true",
                "dropout": False,
                "fused": False,
                "pool_first": False,
            },
        }
    else:
        variants = {
            "default": {"precision": "bf16-mixed"},
            "DataLoader, 4 workers, pinned": {"precision": "bf16-mixed", "device_batches": False},
            "progress bar every step": {"precision": "bf16-mixed", "refresh_rate": 1},
            "fp32 (no bf16 autocast)": {"precision": "32-true"},
        }
    rates: dict[str, list[float]] = {name: [] for name in variants}
    for settings in variants.values():  # warm-up of each path
        measure(datamodule, args.device, min(args.batches, 10), **settings)
    for repeat in range(args.repeats):
        order = list(variants.items())
        for name, settings in order if repeat % 2 == 0 else order[::-1]:
            rates[name].append(measure(datamodule, args.device, args.batches, **settings))
    base = statistics.median(rates["default"])
    machine = (
        torch.cuda.get_device_name() if args.device == "cuda" else f"{os.cpu_count()} CPU cores"
    )
    print(
        f"\nLightning training rate, study CNN 128 px, batch 32, {args.batches} steps, {machine}:"
    )
    for name, values in rates.items():
        value = statistics.median(values)
        print(f"  {name:<56} {value:8.0f} img/s  ({value / base:5.2f}x the default)")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "speed_levers.json").write_text(
            json.dumps({"machine": machine, "rates": rates}, indent=2)
        )


if __name__ == "__main__":
    main()
