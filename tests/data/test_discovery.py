from pathlib import Path

import pytest

from pneumonia.data.discovery import DataLayoutError, discover_images, scan_images
from tests.conftest import copy_image, make_subset


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


def test_an_empty_root_is_not_the_working_folder(data_root, tmp_path, monkeypatch):
    make_subset(data_root, tmp_path, per_class=2)  # images right here, as a stray cwd may hold
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataLayoutError, match="data root is empty.*PNEUMONIA_DATA"):
        discover_images("")
    with pytest.raises(DataLayoutError, match="data root is empty"):
        discover_images("  ")


def test_a_root_named_like_a_class_labels_only_when_it_holds_no_class_folder(
    data_root, tmp_path, caplog
):
    # A checkout called "pneumonia" holding a dataset and loose X-rays: the loose ones have no label.
    root = make_subset(data_root, tmp_path / "pneumonia", per_class=2)
    loose = copy_image(
        sorted((data_root / "train" / "NORMAL").iterdir())[5], root / "misc" / "x.jpeg"
    )
    copy_image(loose, root / "COVID19" / "y.jpeg")
    images = discover_images(root)
    assert [img.label for img in images] == [0, 0, 1, 1]
    assert "left out 2 image(s)" in caplog.text and "COVID19/y.jpeg" in caplog.text


def test_different_images_with_one_name_are_all_kept(data_root, tmp_path):
    # Per-patient exports name every first image alike; same byte size does not make them copies.
    sources = sorted((data_root / "train" / "NORMAL").iterdir())[:2]
    for i, source in enumerate(sources):
        copy_image(source, tmp_path / "site" / "NORMAL" / f"patient{i}" / "IM-0001-0001.jpeg")
        with open(tmp_path / "site" / "NORMAL" / f"patient{i}" / "IM-0001-0001.jpeg", "r+b") as f:
            f.truncate(9000)  # equal sizes; the cut JPEGs differ in content
    assert len(discover_images(tmp_path / "site", require_both_classes=False)) == 2


# --- odd entries are skipped and listed, never fatal ---------------------------------------------


def test_dangling_and_looping_links_are_skipped_and_listed(data_root, tmp_path, caplog):
    root = make_subset(data_root, tmp_path / "chest_xray", per_class=2)
    normal = root / "train" / "NORMAL"
    (normal / "IM-9999-0001.jpeg").symlink_to(tmp_path / "deleted.jpeg")
    (normal / "IM-9998-0001.jpeg").symlink_to(normal / "IM-9997-0001.jpeg")
    (normal / "IM-9997-0001.jpeg").symlink_to(normal / "IM-9998-0001.jpeg")
    found = scan_images(root)
    assert len(found.images) == 4
    assert set(found.skipped) == {
        str(normal / "IM-9999-0001.jpeg"),
        str(normal / "IM-9998-0001.jpeg"),
        str(normal / "IM-9997-0001.jpeg"),
    }
    assert "dangling symbolic link" in found.skipped[str(normal / "IM-9999-0001.jpeg")]
    assert "symbolic link loop" in found.skipped[str(normal / "IM-9998-0001.jpeg")]
    warning = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warning) == 1 and "skipped 3 entries" in warning[0]
    assert all(name in warning[0] for name in ("IM-9999-0001", "IM-9998-0001", "IM-9997-0001"))
    assert discover_images(root) == found.images  # the list API stays as it was


def test_folder_link_loop_is_walked_once(data_root, tmp_path):
    root = make_subset(data_root, tmp_path / "chest_xray", per_class=2)
    # Without care, followlinks=True walks train/NORMAL/up/NORMAL/up/... forty levels deep.
    (root / "train" / "NORMAL" / "up").symlink_to(root / "train")
    found = scan_images(root)
    assert len(found.images) == 4
    assert list(found.skipped) == [str(root / "train" / "NORMAL" / "up")]
    assert "already walked" in found.skipped[str(root / "train" / "NORMAL" / "up")]


def test_a_folder_named_like_an_image_is_skipped(data_root, tmp_path):
    root = make_subset(data_root, tmp_path / "chest_xray", per_class=2)
    (root / "train" / "PNEUMONIA" / "person1_virus_1.jpeg").mkdir()
    assert len(discover_images(root)) == 4


def test_only_unusable_entries_is_a_layout_error_that_says_so(tmp_path):
    (tmp_path / "NORMAL").mkdir()
    (tmp_path / "PNEUMONIA").mkdir()
    (tmp_path / "NORMAL" / "IM-0001-0001.jpeg").symlink_to(tmp_path / "gone.jpeg")
    with pytest.raises(
        DataLayoutError, match=r"no NORMAL or PNEUMONIA images.*1 entries were skipped"
    ):
        discover_images(tmp_path)


def test_names_without_patient_id_are_counted_in_one_warning(data_root, tmp_path, caplog):
    root = make_subset(data_root, tmp_path / "chest_xray", per_class=2)
    source = sorted((data_root / "train" / "NORMAL").iterdir())[5]
    for name in ("scan_a.jpeg", "scan_b.jpeg", "scan_c.jpeg", "scan_d.jpeg"):
        copy_image(source, root / "train" / "NORMAL" / name)
    found = scan_images(root)
    assert [p.name for p in found.without_patient_id] == [
        "scan_a.jpeg",
        "scan_b.jpeg",
        "scan_c.jpeg",
        "scan_d.jpeg",
    ]
    assert {img.patient for img in found.images if img.path.name.startswith("scan_")} == {
        "scan_a",
        "scan_b",
        "scan_c",
        "scan_d",
    }
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1
    assert "4 of 8 images" in warnings[0] and "no patient id" in warnings[0]
    assert "scan_a.jpeg, scan_b.jpeg, scan_c.jpeg" in warnings[0] and "scan_d" not in warnings[0]


def test_kaggle_names_raise_no_patient_warning(data_root, tmp_path, caplog):
    found = scan_images(make_subset(data_root, tmp_path / "chest_xray", per_class=3))
    assert found.without_patient_id == [] and found.skipped == {}
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


def test_patient_ids_that_look_wrong_are_warned_of(data_root, tmp_path, caplog):
    # Folder-per-patient exports: every file is IM-0001-0001.jpeg, so one "patient" has them all.
    sources = (
        sorted((data_root / "train" / "NORMAL").iterdir())[:12]
        + sorted((data_root / "train" / "PNEUMONIA").iterdir())[:12]
    )
    for i, source in enumerate(sources):
        label = "NORMAL" if i < 12 else "PNEUMONIA"
        copy_image(source, tmp_path / "pacs" / label / f"child{i}" / "IM-0001-0001.jpeg")
    discover_images(tmp_path / "pacs")
    assert "1 patient id(s) hold images of both classes (e.g. IM-0001)" in caplog.text
    for i, source in enumerate(sorted((data_root / "train" / "NORMAL").iterdir())[:24]):
        copy_image(source, tmp_path / "pacs2" / "NORMAL" / f"child{i}" / "IM-0001-0001.jpeg")
    caplog.clear()
    discover_images(tmp_path / "pacs2", require_both_classes=False)
    assert "patient id IM-0001 holds 24 of the 24 images" in caplog.text
    caplog.clear()
    discover_images(data_root)
    assert "patient id" not in caplog.text  # the real data's ids are fine


def test_images_in_other_formats_are_skipped_with_the_reason(data_root, tmp_path):
    root = make_subset(data_root, tmp_path / "chest_xray", per_class=2)
    for name in ("scan.bmp", "scan.DCM", "notes.txt", "MANIFEST.csv"):
        (root / "train" / "NORMAL" / name).write_bytes(b"x")
    found = scan_images(root)
    assert len(found.images) == 4
    assert sorted(Path(path).name for path in found.skipped) == ["scan.DCM", "scan.bmp"]
    assert (
        "only JPEG and PNG are read; convert it to PNG"
        in found.skipped[str(root / "train" / "NORMAL" / "scan.bmp")]
    )
