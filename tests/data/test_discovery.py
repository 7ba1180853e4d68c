import pytest

from pneumonia.data.discovery import DataLayoutError, discover_images
from tests.conftest import make_subset


def test_kaggle_layout_of_the_real_data(data_root):
    images = discover_images(data_root)
    assert len(images) == 5232
    assert sum(img.label == 1 for img in images) == 3875 + 8
    assert [str(img.path) for img in images] == sorted(str(img.path) for img in images)
    assert {img.patient for img in images if img.path.name == "IM-0115-0001.jpeg"} == {"IM-0115"}


def test_flat_and_nested_layouts(data_root, tmp_path):
    flat = make_subset(data_root, tmp_path / "flat", per_class=3, flat=True)
    assert [img.label for img in discover_images(flat)] == [0, 0, 0, 1, 1, 1]
    make_subset(data_root, tmp_path / "a" / "b" / "deep", per_class=2)
    assert len(discover_images(tmp_path / "a")) == 4


def test_skips_macos_junk_other_files_and_duplicate_copies(data_root, tmp_path):
    root = make_subset(data_root, tmp_path / "chest_xray", per_class=2)
    (root / "train" / "NORMAL" / "._IM-0115-0001.jpeg").write_bytes(b"resource fork")
    (root / "train" / "NORMAL" / "notes.txt").write_text("not an image")
    (root / "__MACOSX" / "NORMAL").mkdir(parents=True)
    (root / "__MACOSX" / "NORMAL" / "x.jpeg").write_bytes(b"junk")
    make_subset(data_root, root / "chest_xray", per_class=2)  # Kaggle's second copy of the data
    images = discover_images(root)
    assert len(images) == 4


def test_missing_root_names_the_path_and_how_to_fix_it(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataLayoutError, match=r"nowhere.*make data.*NORMAL and PNEUMONIA"):
        discover_images(missing)


def test_missing_class_folder_is_named(data_root, tmp_path):
    root = make_subset(data_root, tmp_path / "one_class", per_class=2)
    for image in (root / "train" / "PNEUMONIA").iterdir():
        image.unlink()
    with pytest.raises(DataLayoutError, match=r"no PNEUMONIA images found under .*one_class"):
        discover_images(root)


def test_a_class_folder_itself_can_be_the_root(data_root, tmp_path):
    root = make_subset(data_root, tmp_path / "subset", per_class=2, flat=True)
    images = discover_images(root / "PNEUMONIA", require_both_classes=False)
    assert [img.label for img in images] == [1, 1]
    with pytest.raises(DataLayoutError, match="no NORMAL images"):
        discover_images(root / "PNEUMONIA")
