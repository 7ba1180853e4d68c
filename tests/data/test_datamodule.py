import csv
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from sklearn.utils.class_weight import compute_class_weight

from pneumonia.data.class_weights import balanced_class_weights
from pneumonia.data.datamodule import ChestXrayDataModule, EmptySplitError, interleave_classes
from pneumonia.data.discovery import DataLayoutError
from pneumonia.data.image_io import load_grayscale
from tests.conftest import copy_image, make_subset


def _datamodule(root, cache_dir, **kwargs):
    defaults = dict(image_size=64, batch_size=16, cache_dir=cache_dir, decode_workers=1)
    return ChestXrayDataModule(root, **{**defaults, **kwargs})


def test_class_weights_come_from_the_training_split_only(data_root, cache_dir, tmp_path):
    given: list[np.ndarray] = []

    def recording(labels: np.ndarray) -> np.ndarray:
        given.append(np.array(labels))
        return balanced_class_weights(labels)

    dm = _datamodule(
        data_root, cache_dir, class_weighting=recording, split_csv=tmp_path / "split.csv"
    )
    dm.prepare_data()
    dm.setup("fit")
    train_rows = np.flatnonzero(dm.splits == "train")
    train_labels = np.array([dm.images[i].label for i in train_rows])
    # The weighting saw the training labels, exactly, and nothing of validation or test.
    assert len(given) == 1
    np.testing.assert_array_equal(given[0], train_labels)
    assert 0 < len(train_labels) < len(dm.images)
    expected = compute_class_weight("balanced", classes=np.array([0, 1]), y=train_labels)
    np.testing.assert_allclose(dm.class_weights, expected)
    assert dm.class_weights[0] > 1.5 > 0.8 > dm.class_weights[1]  # NORMAL is the minority
    # split.csv records every image with the split it was given, paths relative to the root.
    rows = list(csv.DictReader((tmp_path / "split.csv").open()))
    assert {r["path"]: r["split"] for r in rows} == {
        str(img.path.relative_to(data_root)): split
        for img, split in zip(dm.images, dm.splits, strict=True)
    }
    assert len(rows) == 5232 and {r["split"] for r in rows} == {"train", "val", "test"}


def test_batches_hold_the_pixels_and_labels_of_their_split(small_root, cache_dir):
    dm = _datamodule(small_root, cache_dir)
    dm.prepare_data()
    dm.setup("fit")
    rows = {split: np.flatnonzero(dm.splits == split) for split in ("train", "val", "test")}
    assert sorted(np.concatenate(list(rows.values())).tolist()) == list(range(120))
    assert len(rows["train"]) > 80 and len(rows["val"]) <= 16
    # Validation is not shuffled: its one batch is the val images in the dataset's order (its
    # rows name the files), decoded as uint8.
    order = dm.dataset("val").rows
    assert sorted(order.tolist()) == rows["val"].tolist()
    images, labels = next(iter(dm.val_dataloader()))
    expected = np.stack([load_grayscale(dm.images[i].path, 64) for i in order])
    assert images.dtype == torch.uint8 and images.shape == (len(rows["val"]), 1, 64, 64)
    np.testing.assert_array_equal(images[:, 0].numpy(), expected)
    assert labels.dtype == torch.float32
    assert labels.tolist() == [float(dm.images[i].label) for i in order]
    assert set(labels.tolist()) == {0.0, 1.0}
    # Training batches are full and come in a new order every epoch.
    first, second = (torch.cat([x for x, _ in dm.train_dataloader()]) for _ in range(2))
    assert dm.train_dataloader().batch_size == 16 and len(first) == len(rows["train"])
    assert not torch.equal(first, second)
    assert torch.equal(first.sum(dim=0), second.sum(dim=0))  # the same images, reordered
    # Pixel statistics are those of the training images alone.
    train = np.stack([load_grayscale(dm.images[i].path, 64) for i in rows["train"]]) / 255.0
    assert dm.pixel_mean == pytest.approx(train.mean(), rel=1e-9)
    assert dm.pixel_std == pytest.approx(train.std(), rel=1e-9)


def test_memmap_dataset_survives_pickling_into_workers(small_root, cache_dir):
    dm = _datamodule(small_root, cache_dir, num_workers=2)
    dm.prepare_data()
    dm.setup("fit")
    batches = list(dm.val_dataloader())
    pixels, labels = dm.split_arrays("val")
    # Each worker reopens the cache: the same pixels and labels as read in this process.
    assert torch.equal(torch.cat([x for x, _ in batches]), pixels)
    assert torch.equal(torch.cat([y for _, y in batches]).to(labels.dtype), labels)


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


def test_a_class_whose_images_all_fail_to_decode_stops_the_run(data_root, cache_dir, tmp_path):
    # Found as files, but none decodes (not JPEGs under .jpeg names, cloud placeholders, ...):
    # training on NORMAL alone would score a perfect balanced accuracy on NORMAL-only validation.
    root = make_subset(data_root, tmp_path / "one_class_broken", per_class=20)
    for image in (root / "train" / "PNEUMONIA").iterdir():
        image.unlink()
        image.write_bytes(b"version https://git-lfs.github.com/spec/v1\n")
    dm = _datamodule(root, cache_dir)
    dm.prepare_data()
    with pytest.raises(
        DataLayoutError, match=r"holds no PNEUMONIA image: 20 of the 20 PNEUMONIA images found"
    ):
        dm.setup("fit")
    # A one-class folder to evaluate is fine: it asked for no second class.
    one_class = _datamodule(root, cache_dir, split_fractions=[0, 0, 1], require_both_classes=False)
    one_class.prepare_data()
    one_class.setup("test")
    assert len(one_class.dataset("test")) == 20


def test_one_xray_under_two_names_across_the_split_is_warned_of(data_root, cache_dir, tmp_path, caplog):  # fmt: skip
    # The Kermany set's 24 groups of identical files each stay within one child: no warning.
    real = _datamodule(data_root, cache_dir)
    real.prepare_data()
    real.setup("fit")
    assert "different sides of the split" not in caplog.text
    assert sum(len(rows) > 1 for rows in real._pixel_twins().values()) == 24
    # A per-image split scatters them.
    by_image = _datamodule(data_root, cache_dir, group_by="image")
    by_image.prepare_data()
    by_image.setup("fit")
    assert "on different sides of the split (at 64 px, pixel for pixel)" in caplog.text


@pytest.mark.parametrize("copy_name", ["{name}", "copy_{name}", "sub/{name}"])
def test_one_xray_under_both_labels_is_refused_whatever_its_name(
    data_root, cache_dir, tmp_path, copy_name
):
    root = make_subset(data_root, tmp_path / "chest_xray", per_class=20)
    normal = sorted((root / "train" / "NORMAL").iterdir())[0]
    copy = root / "test" / "PNEUMONIA" / copy_name.format(name=normal.name)
    copy_image(normal, copy)
    dm = _datamodule(root, cache_dir, image_size=32)
    dm.prepare_data()
    with pytest.raises(
        DataLayoutError,
        match=rf"1 X-ray\(s\) .* both NORMAL and PNEUMONIA .*{copy.name} \(PNEUMONIA\)",
    ):
        dm.setup("fit")


def test_an_external_copy_of_pool_images_is_found(data_root, small_root, cache_dir, tmp_path):
    pool = _datamodule(small_root, cache_dir, image_size=32)
    pool.prepare_data()
    pool.setup("fit")
    copied = sorted((small_root / "train" / "PNEUMONIA").iterdir())[:3]
    external_root = make_subset(data_root, tmp_path / "site_b", per_class=2, flat=True)
    for i, image in enumerate(copied):
        copy_image(image, external_root / "PNEUMONIA" / f"site_b_{i}.jpeg")  # renamed copies
    pool.external_tests = {"site_b": external_root}
    external = pool.external_test_set("site_b")
    pairs = pool.copies_in_pool(external)
    assert sorted((a.name, b.name) for a, b in pairs) == sorted(
        [(f"site_b_{i}.jpeg", image.name) for i, image in enumerate(copied)]
        + [(p.name, p.name) for p in (external_root / "NORMAL").iterdir()]
        + [(p.name, p.name) for p in sorted((external_root / "PNEUMONIA").iterdir())[:2]]
    )  # make_subset links the pool's first images: those are copies too


def test_bad_settings_are_named(small_root, cache_dir):
    with pytest.raises(ValueError, match="data.cache_dir is empty.*PNEUMONIA_CACHE"):
        _datamodule(small_root, "")
    with pytest.raises(ValueError, match="group_by='person'"):
        _datamodule(small_root, cache_dir, group_by="person")
    with pytest.raises(ValueError, match="image_size=16"):
        _datamodule(small_root, cache_dir, image_size=16)
    for batch_size in (0, -4, 2.5):
        with pytest.raises(ValueError, match=f"data.batch_size={batch_size!r} must be a whole"):
            _datamodule(small_root, cache_dir, batch_size=batch_size)
    for seed in (-1, 2**32, 1.5, "7"):
        with pytest.raises(ValueError, match=f"data.seed={seed!r} must be a whole number"):
            _datamodule(small_root, cache_dir, seed=seed)


@pytest.mark.parametrize(
    ("name", "folder", "message"),
    [
        ("site b", "{root}", "letters, digits"),
        ("..", "{root}", "letters, digits"),
        ("site_b", "", "give one folder"),
        ("site_b", None, "give one folder"),
        ("site_b", {"nested": "x"}, "give one folder"),
        ("site_b", "/nonexistent/site_b", "'/nonexistent/site_b' is not an existing folder"),
    ],
)
def test_external_test_sets_need_a_plain_name_and_a_folder(
    small_root, cache_dir, name, folder, message
):
    folder = folder.format(root=small_root) if isinstance(folder, str) else folder
    with pytest.raises(ValueError, match=message) as raised:
        _datamodule(small_root, cache_dir, external_tests={name: folder})
    assert f"data.external_tests.{name}" in str(raised.value)


def test_an_external_folder_without_images_fails_before_training(small_root, cache_dir, tmp_path):
    from pneumonia.data.discovery import DataLayoutError

    (tmp_path / "empty" / "NORMAL").mkdir(parents=True)
    datamodule = _datamodule(small_root, cache_dir, external_tests={"empty": tmp_path / "empty"})
    with pytest.raises(DataLayoutError, match="data.external_tests.empty: no"):
        datamodule.prepare_data()


def test_an_unusable_external_set_fails_before_training(data_root, small_root, cache_dir, tmp_path):
    # One X-ray under both labels, and a set of files that do not decode: found only after
    # fitting before, when the run was marked failed and its training was lost.
    conflict = make_subset(data_root, tmp_path / "conflict", per_class=1, flat=True)
    copy_image(next((conflict / "NORMAL").iterdir()), conflict / "PNEUMONIA" / "same.jpeg")
    broken = tmp_path / "broken"
    for label in ("NORMAL", "PNEUMONIA"):
        (broken / label).mkdir(parents=True)
        (broken / label / "IM-0001-0001.jpeg").write_bytes(b"version https://git-lfs")
    for name, folder, error in (
        ("conflict", conflict, DataLayoutError),
        ("broken", broken, EmptySplitError),
    ):
        datamodule = _datamodule(small_root, cache_dir, external_tests={name: folder})
        with pytest.raises(error, match=f"data.external_tests.{name}: "):
            datamodule.prepare_data()


def test_an_xray_twice_in_an_external_set_is_warned_of(data_root, small_root, cache_dir, tmp_path, caplog):  # fmt: skip
    site = make_subset(data_root, tmp_path / "site", per_class=2, flat=True)
    original = sorted((site / "NORMAL").iterdir())[0]
    copy_image(original, site / "NORMAL" / "renamed.jpeg")
    datamodule = _datamodule(small_root, cache_dir, external_tests={"site": site})
    datamodule.external_test_set("site")
    assert "1 X-ray(s) of" in caplog.text and "renamed.jpeg" in caplog.text
    caplog.clear()
    (site / "NORMAL" / "renamed.jpeg").unlink()
    _datamodule(small_root, cache_dir, external_tests={"site": site}).external_test_set("site")
    assert "X-ray(s) of" not in caplog.text


def test_an_external_set_is_every_image_of_its_folder(small_root, originals_root, cache_dir):
    datamodule = _datamodule(small_root, cache_dir, external_tests={"orig": originals_root})
    images, labels = datamodule.external_test_set("orig").split_arrays("test")
    assert images.shape == (40, 1, 64, 64) and images.dtype == torch.uint8
    assert sorted(labels.unique().tolist()) == [0.0, 1.0]


def test_interleaving_spreads_each_class_evenly_and_keeps_its_order():
    labels = np.array([0] * 5 + [1] * 12)  # grouped by class, as folders are scanned
    order = interleave_classes(labels)
    assert sorted(order.tolist()) == list(range(17))  # a permutation: nothing lost or repeated
    for label in (0, 1):  # each class keeps its own order
        members = order[labels[order] == label]
        assert members.tolist() == sorted(members.tolist())
    ordered = labels[order]
    assert set(ordered[:2]) == {0, 1}
    for end in range(1, 18):  # every prefix holds NORMAL in about its share, 5/17
        assert abs(int((ordered[:end] == 0).sum()) - end * 5 / 17) <= 1
    np.testing.assert_array_equal(interleave_classes(labels), order)  # deterministic
    np.testing.assert_array_equal(interleave_classes(np.ones(4, dtype=int)), np.arange(4))
    assert len(interleave_classes(np.array([], dtype=int))) == 0
    one_normal = np.array([1] * 50 + [0])
    assert one_normal[interleave_classes(one_normal)][0] == 0  # even a lone image comes first


@pytest.mark.parametrize("split", ["val", "test"])
def test_the_first_evaluation_batches_hold_both_classes(small_root, cache_dir, split):
    # debug=limit evaluates two batches: with the images grouped by class they were all NORMAL,
    # so every metric was 0 and AUROC undefined.
    dm = _datamodule(small_root, cache_dir, batch_size=4)
    dm.prepare_data()
    dm.setup("fit")
    loader = dm.val_dataloader() if split == "val" else dm.test_dataloader()
    _, first_labels = next(iter(loader))
    assert set(first_labels.tolist()) == {0.0, 1.0}
    # The same images and labels as before, each once, each with its own file's label.
    dataset = dm.dataset(split)
    rows = np.flatnonzero(dm.splits == split)
    assert sorted(dataset.rows.tolist()) == rows.tolist()
    assert dataset.labels.tolist() == [float(dm.images[i].label) for i in dataset.rows]
    pixels, labels = dm.split_arrays(split)
    assert torch.equal(labels, dataset.labels)
    for index in (0, len(dataset) - 1):  # split_arrays is in the dataset's order too
        assert torch.equal(pixels[index], dataset[index][0])
    # Training images stay in the order of the images (the loader shuffles them).
    np.testing.assert_array_equal(dm.dataset("train").rows, np.flatnonzero(dm.splits == "train"))


def test_ddp_evaluation_shards_hold_every_image_once(small_root, cache_dir):
    # Lightning's DistributedSampler pads a shard by repeating images, which a confusion matrix
    # would count twice; each rank here gets its own images and together they are the split.
    shards = []
    for rank in (0, 1):
        dm = _datamodule(small_root, cache_dir, batch_size=4)
        dm.prepare_data()
        dm.setup("fit")
        dm.trainer = SimpleNamespace(world_size=2, global_rank=rank, is_global_zero=rank == 0)
        for split in ("val", "test"):
            loader = dm.val_dataloader() if split == "val" else dm.test_dataloader()
            rows = dm.dataset(split).rows
            assert len(rows) % 2 == 1  # an odd count: padding would repeat one image
            shards.append((split, rank, [rows[i] for i in loader.sampler]))
    for split in ("val", "test"):
        first, second = (shard for name, _, shard in shards if name == split)
        assert not set(first) & set(second)
        assert sorted(first + second) == sorted(dm.dataset(split).rows.tolist())


def test_ddp_with_more_processes_than_evaluation_images_is_a_clear_error(small_root, cache_dir):
    dm = _datamodule(small_root, cache_dir)
    dm.prepare_data()
    dm.setup("fit")
    dm.trainer = SimpleNamespace(world_size=64, global_rank=0, is_global_zero=True)
    with pytest.raises(EmptySplitError, match=r"the val split .* fewer than the 64 processes"):
        dm.val_dataloader()


def test_a_split_too_small_for_its_fraction_says_how_many_images_it_takes(
    data_root, cache_dir, tmp_path
):
    root = make_subset(data_root, tmp_path / "tiny", per_class=2)
    dm = _datamodule(root, cache_dir, split_fractions=[0.9, 0.05, 0.05], group_by="image")
    dm.prepare_data()
    dm.setup("fit")
    with pytest.raises(
        EmptySplitError,
        match=r"the val split .* is empty .* a 0.05 share of each class is less than one of its "
        r"images: give each class at least 20 images",
    ):
        dm.val_dataloader()
