"""Helpers for running the entry points through Hydra's command line, as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT


def run_entry(
    script: str,
    *overrides: str,
    cache_dir: Path,
    config_name: str | None = None,
    check: bool = True,
    extra: tuple[str, ...] = ("trainer.enable_progress_bar=false",),
) -> subprocess.CompletedProcess:
    """Run ``script`` (train.py or explain.py) with Hydra overrides; fail with its output on error."""
    command = [sys.executable, str(ROOT / script)]
    if config_name:
        command += ["--config-name", config_name]
    command += [*overrides, *extra, "hydra.job_logging.root.level=INFO"]
    env = {**os.environ, "PNEUMONIA_CACHE": str(cache_dir), "PYTHONWARNINGS": "ignore"}
    env.pop("PNEUMONIA_DATA", None)
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(command)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
        )
    return result


def train(*overrides: str, **kwargs) -> subprocess.CompletedProcess:
    return run_entry("train.py", *overrides, **kwargs)


def explain(*overrides: str, **kwargs) -> subprocess.CompletedProcess:
    return run_entry("explain.py", *overrides, extra=(), **kwargs)


@pytest.fixture(scope="session")
def short_run(small_root, cache_dir, tmp_path_factory) -> Path:
    """One short epoch with checkpoints and attribution maps, on 120 real images at 64 px."""
    run_dir = tmp_path_factory.mktemp("short") / "run"
    train(
        f"data.root={small_root}",
        "image_size=64",
        "debug=limit",
        "trainer.max_epochs=1",
        f"run_dir={run_dir}",
        cache_dir=cache_dir,
    )
    return run_dir
