"""Benchmark: trials per hour of a sweep, one job after another against several at once.

Runs the same multirun twice through ``train.py`` (so start-up, data loading, testing and the
sweep summary all count): with Hydra's basic launcher (sequential), then with
``hydra/launcher=shared_device`` (joblib, ``--jobs`` trials at once sharing the one device).
Prints the wall time and trials per hour of each, and their ratio.

    python benchmarks/trials_per_device.py --trainer gpu --jobs 4          # one GPU
    python benchmarks/trials_per_device.py --jobs 2 --epochs 1 --image-size 64   # this CPU
    python benchmarks/trials_per_device.py --grid optimizer=adam,sgd --overrides data.root=<folder>

The grid is the study grid's optimizer x class weighting (6 trials) at one image size; pass
``--grid`` for another. This is a measurement, not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GRID = ["optimizer=adam,sgd,sgd_momentum", "class_weighting=none,balanced"]


def sweep(out: Path, trainer: str, launcher: list[str], args: argparse.Namespace) -> float:
    command = [
        sys.executable, str(ROOT / "train.py"), "-m", *(args.grid or GRID),
        f"trainer={trainer}", f"image_size={args.image_size}", f"trainer.max_epochs={args.epochs}",
        f"hydra.sweep.dir={out}", "trainer.enable_progress_bar=false", *launcher, *args.overrides,
    ]  # fmt: skip
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trainer", default="cpu", help="trainer config: cpu or gpu")
    parser.add_argument("--jobs", type=int, default=4, help="trials at once on the device")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--grid", nargs="*", default=None, help="sweep overrides (key=a,b ...)")
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / "outputs" / "benchmarks" / ("trials-" + time.strftime("%Y-%m-%d_%H-%M-%S")),
    )
    parser.add_argument(
        "--overrides", nargs="*", default=[], help="extra Hydra overrides for every trial"
    )
    args = parser.parse_args()

    trials = 1
    for axis in args.grid or GRID:
        trials *= len(axis.split("=", 1)[1].split(","))
    launchers = {
        "sequential": [],
        f"{args.jobs} at once": [
            "hydra/launcher=shared_device",
            f"hydra.launcher.n_jobs={args.jobs}",
        ],
    }
    results = {"trials": trials, "trainer": args.trainer, "epochs": args.epochs, "runs": {}}
    for name, launcher in launchers.items():
        seconds = sweep(args.out / name.replace(" ", "_"), args.trainer, launcher, args)
        results["runs"][name] = {"wall_s": seconds, "trials_per_hour": trials * 3600 / seconds}
        print(
            f"{name:<14} {trials} trials in {seconds:7.1f} s: {trials * 3600 / seconds:6.1f} trials/hour",
            flush=True,
        )
    sequential, concurrent = (r["wall_s"] for r in results["runs"].values())
    results["speedup"] = sequential / concurrent
    print(
        f"several at once: {results['speedup']:.2f}x the trials per hour ({os.cpu_count()} CPU cores)"
    )
    (args.out / "trials_per_device.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
