import csv

import numpy as np
import pytest
import torch
from sklearn.utils.class_weight import compute_class_weight

from pneumonia.data.class_weights import balanced_class_weights
from pneumonia.data.datamodule import ChestXrayDataModule, EmptySplitError
from tests.conftest import make_subset


def _datamodule(root, cache_dir, **kwargs):
    defaults = dict(image_size=64, batch_size=16, cache_dir=cache_dir, decode_workers=1)
    return ChestXrayDataModule(root, **{**defaults, **kwargs})


def test_class_weights_come_from_the_training_split_only(data_root, cache_dir, tmp_path):
    dm = _datamodule(
        data_root,
        cache_dir,
        class_weighting=balanced_class_weights,
        split_csv=tmp_path / "split.csv",
    )
    dm.prepare_data()
    dm.setup("fit")
    train_labels = dm.dataset("train").labels.numpy().astype(int)
    expected = compute_class_weight("balanced", classes=np.array([0, 1]), y=train_labels)
    np.testing.assert_allclose(dm.class_weights, expected)
    assert dm.class_weights[0] > 1.5 > 0.8 > dm.class_weights[1]  # NORMAL is the minority
    rows = list(csv.DictReader((tmp_path / "split.csv").open()))
    assert len(rows) == 5232
    assert {r["split"] for r in rows} == {"train", "val", "test"}
    assert sum(r["split"] == "train" for r in rows) == len(train_labels)
    assert not rows[0]["path"].startswith("/")  # relative to the data root, portable


def test_batches_are_uint8_images_and_float_labels(small_root, cache_dir):
    dm = _datamodule(small_root, cache_dir)
    dm.prepare_data()
    dm.setup("fit")
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (16, 1, 64, 64) and images.dtype == torch.uint8
    assert labels.dtype == torch.float32 and set(labels.tolist()) <= {0.0, 1.0}
    assert 0.1 < dm.pixel_mean < 0.9 and 0.05 < dm.pixel_std < 0.5
    sizes = [len(dm.dataset(s)) for s in ("train", "val", "test")]
    assert sum(sizes) == 120 and sizes[0] > 80


def test_memmap_dataset_survives_pickling_into_workers(small_root, cache_dir):
    dm = _datamodule(small_root, cache_dir, num_workers=2)
    dm.prepare_data()
    dm.setup("fit")
    seen = sum(len(labels) for _, labels in dm.val_dataloader())
    assert seen == len(dm.dataset("val"))


def test_empty_split_is_a_clear_error(small_root, cache_dir):
    dm = _datamodule(small_root, cache_dir, split_fractions=[1.0, 0.0, 0.0])
    dm.prepare_data()
    dm.setup("fit")
    with pytest.raises(EmptySplitError, match=r"the val split of .* is empty"):
        dm.val_dataloader()


def test_unreadable_images_are_left_out_of_every_split(data_root, cache_dir, tmp_path):
    root = make_subset(data_root, tmp_path / "with_corrupt", per_class=20)
    (root / "train" / "NORMAL" / "IM-9999-0001.jpeg").write_bytes(b"\xff\xd8 broken")
    dm = _datamodule(root, cache_dir)
    dm.prepare_data()
    dm.setup("fit")
    assert (dm.splits == "skipped").sum() == 1
    assert sum(len(dm.dataset(s)) for s in ("train", "val", "test")) == 40


def test_bad_settings_are_named(small_root, cache_dir):
    with pytest.raises(ValueError, match="group_by='person'"):
        _datamodule(small_root, cache_dir, group_by="person")
    with pytest.raises(ValueError, match="image_size=16"):
        _datamodule(small_root, cache_dir, image_size=16)
