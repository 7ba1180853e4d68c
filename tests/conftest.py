"""Shared fixtures: where the real data lies, small real subsets, and composed configs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, open_dict

import pneumonia.hydra_hooks  # noqa: F401  (registers the ${pneumonia.*} resolvers, as train.py does)

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"
os.environ.setdefault("PNEUMONIA_ROOT", str(ROOT))

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two test processes (pytest-xdist); with torch's default of one intra-op
    # thread per core each, they would oversubscribe the cores. The train.py subprocesses that
    # integration tests start keep the default, as a user's run does.
    torch.set_num_threads(1)


def _find_data_root() -> Path:
    candidates = [
        os.environ.get("PNEUMONIA_DATA"),
        ROOT / "data" / "chest_xray",
        ROOT.parent / "shared" / "data" / "chest_xray",
    ]
    for candidate in candidates:
        if candidate and Path(candidate, "train").is_dir():
            return Path(candidate).resolve()
    raise RuntimeError(
        "the real chest X-rays were not found (looked in $PNEUMONIA_DATA, data/chest_xray and "
        "../shared/data/chest_xray); run `make data` or set PNEUMONIA_DATA"
    )


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The real Kermany chest X-rays (Kaggle layout, train and val splits)."""
    return _find_data_root()


@pytest.fixture(scope="session")
def originals_root(data_root: Path) -> Path:
    """Full-resolution originals (some RGB) beside the resized copy."""
    path = data_root.parent / "originals"
    if not path.is_dir():
        pytest.fail(f"{path} is missing: the tests need the full-size originals of ../shared/data")
    return path


def make_subset(data_root: Path, dest: Path, per_class: int, flat: bool = False) -> Path:
    """Link ``per_class`` real images of each class (whole patients, sorted) into ``dest``."""
    for label in ("NORMAL", "PNEUMONIA"):
        target = dest / label if flat else dest / "train" / label
        target.mkdir(parents=True, exist_ok=True)
        for source in sorted((data_root / "train" / label).iterdir())[:per_class]:
            (target / source.name).symlink_to(source)
    return dest


@pytest.fixture(scope="session")
def small_root(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """60 + 60 real images in the Kaggle layout: enough for an 80/10/10 split with both classes."""
    return make_subset(data_root, tmp_path_factory.mktemp("small") / "chest_xray", per_class=60)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One decoded-image cache shared by the whole session."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def compose_config(tmp_path: Path, cache_dir: Path) -> Iterator:
    """Compose ``conf/<name>.yaml`` with overrides, as train.py would, writing into ``tmp_path``."""

    def _compose(*overrides: str, config_name: str = "train") -> DictConfig:
        GlobalHydra.instance().clear()
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name, overrides=list(overrides))
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp_path / "run")
            cfg.paths.cache_dir = str(cache_dir)
        return cfg

    yield _compose
    GlobalHydra.instance().clear()


def copy_image(source: Path, dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, dest)
    return dest


@contextmanager
def run_folder_held_elsewhere(folder: Path) -> Iterator[subprocess.Popen]:
    """Another process holding ``folder``'s run lock (as an orphaned sweep worker does); killed
    on leaving."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import time; from pathlib import Path; "
         "from pneumonia.training.status import hold_run_folder\n"
         f"with hold_run_folder(Path({str(folder)!r})):\n print('held', flush=True); time.sleep(300)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        yield holder
    finally:
        holder.kill()
        holder.wait()
