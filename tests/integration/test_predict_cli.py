"""predict.py end to end, as a user runs it, on real X-rays (resized copies and a full-size RGB one)."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import lightning as L
import pytest
import torch

from pneumonia.model.classifier import XrayClassifier
from tests.integration.conftest import run_entry

pytestmark = pytest.mark.integration

NET = {
    "_target_": "pneumonia.model.study_cnn.StudyCNN",
    "image_size": 64,
    "channels": [4, 8, 8],
    "hidden_features": 8,
}


def predict(*overrides: str, **kwargs):
    return run_entry("predict.py", *overrides, "progress=false", extra=(), **kwargs)


def small_run(folder: Path) -> Path:
    """A run folder whose last.ckpt records best.ckpt as its best (threshold 0.35; last: 0.9)."""
    checkpoints = folder / "checkpoints"
    checkpoints.mkdir(parents=True)
    for name, threshold in (("best.ckpt", 0.35), ("last.ckpt", 0.9)):
        torch.manual_seed(0)
        module = XrayClassifier(
            net=NET, optimizer={"_target_": "torch.optim.Adam"}, image_size=64, threshold=threshold
        )
        state = {"best_model_path": f"/elsewhere/{folder.name}/best.ckpt", "dirpath": "/elsewhere"}
        torch.save(
            {
                "state_dict": module.state_dict(),
                "hyper_parameters": dict(module.hparams),
                "pytorch-lightning_version": L.__version__,
                "callbacks": {"ModelCheckpoint{'monitor': 'val/balanced_accuracy'}": state},
            },
            checkpoints / name,
        )
    return folder


def test_a_folder_of_real_images_with_a_broken_one(data_root, originals_root, cache_dir, tmp_path):
    images = tmp_path / "images"
    expected = []
    for label in ("NORMAL", "PNEUMONIA"):
        (images / label).mkdir(parents=True)
        for source in sorted((data_root / "train" / label).iterdir())[:3]:
            (images / label / source.name).symlink_to(source)
            expected.append((str(images / label / source.name), label))
    rgb = originals_root / "PNEUMONIA" / "person888_bacteria_2812.jpeg"  # 527 x 219, RGB
    (images / "incoming").mkdir()
    shutil.copy(rgb, images / "incoming" / rgb.name)
    expected.append((str(images / "incoming" / rgb.name), ""))
    (images / "incoming" / "broken.jpeg").write_bytes(b"\xff\xd8 not an image")
    out = tmp_path / "out"

    result = predict(
        f"ckpt_path={small_run(tmp_path / 'run')}", f"images={images}", f"run_dir={out}",
        "batch_size=4", cache_dir=cache_dir,
    )  # fmt: skip

    with (out / "predictions.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(row["path"], row["label"]) for row in rows] == sorted(expected)
    assert {row["threshold"] for row in rows} == {"0.35"}  # the run's best checkpoint, not last
    for row in rows:
        assert 0 <= float(row["p_pneumonia"]) <= 1
        assert row["decision"] == ("PNEUMONIA" if float(row["p_pneumonia"]) >= 0.35 else "NORMAL")
    with (out / "unreadable.csv").open(newline="") as f:
        assert [row["path"] for row in csv.DictReader(f)] == [str(images / "incoming/broken.jpeg")]
    pneumonia = sum(row["decision"] == "PNEUMONIA" for row in rows)
    assert (
        f"predicted 7 images: {pneumonia} PNEUMONIA at threshold 0.35 (stored in the checkpoint), "
        f"1 unreadable" in result.stdout + result.stderr
    )
    assert str(out / "predictions.csv") in result.stdout + result.stderr


def test_a_missing_checkpoint_fails_with_its_name(data_root, cache_dir, tmp_path):
    result = predict(
        f"ckpt_path={tmp_path / 'nope.ckpt'}", f"images={data_root / 'val'}",
        f"run_dir={tmp_path / 'out'}", cache_dir=cache_dir, check=False,
    )  # fmt: skip
    assert result.returncode == 1
    assert "nope.ckpt does not exist" in result.stderr
    assert not (tmp_path / "out" / "predictions.csv").exists()
