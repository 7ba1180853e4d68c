from pathlib import Path

import pytest

from pneumonia.data.splits import write_split_csv
from pneumonia.explain.inputs import collect_images


def test_folder_file_and_labels(tmp_path):
    (tmp_path / "NORMAL").mkdir()
    (tmp_path / "NORMAL" / "a.jpeg").write_bytes(b"x")
    (tmp_path / "misc").mkdir()
    (tmp_path / "misc" / "b.png").write_bytes(b"x")
    (tmp_path / "misc" / "notes.txt").write_text("x")
    items = collect_images(tmp_path, tmp_path / "m.ckpt", tmp_path)
    assert [(i.path.name, i.label) for i in items] == [("a.jpeg", 0), ("b.png", None)]
    single = collect_images(tmp_path / "NORMAL" / "a.jpeg", tmp_path / "m.ckpt", tmp_path)
    assert single[0].label == 0


def test_run_folder_means_its_test_split(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    write_split_csv(
        run / "split.csv",
        ["train/NORMAL/a.jpeg", "train/PNEUMONIA/b.jpeg"],
        [0, 1],
        ["a", "b"],
        ["train", "test"],
        ("NORMAL", "PNEUMONIA"),
    )
    items = collect_images(None, run / "checkpoints" / "last.ckpt", tmp_path / "data")
    assert [(str(i.path), i.label) for i in items] == [
        (str(tmp_path / "data/train/PNEUMONIA/b.jpeg"), 1)
    ]
    assert collect_images(run, tmp_path / "x.ckpt", tmp_path / "data") == items


def test_nothing_to_explain_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="images=.*nowhere: no such file or folder"):
        collect_images(tmp_path / "nowhere", tmp_path / "m.ckpt", tmp_path)
    with pytest.raises(FileNotFoundError, match="not inside a run folder"):
        collect_images(None, tmp_path / "m.ckpt", tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no .jpeg, .jpg or .png images under"):
        collect_images(tmp_path / "empty", tmp_path / "m.ckpt", tmp_path)


def test_classes_are_interleaved_so_any_prefix_has_both():
    from pneumonia.explain.inputs import ImageToExplain
    from pneumonia.explain.run import _interleave_classes

    items = [ImageToExplain(Path(f"n{i}"), 0) for i in range(3)] + [ImageToExplain(Path("p0"), 1)]
    assert [i.path.name for i in _interleave_classes(items)] == ["n0", "p0", "n1", "n2"]


def test_split_rows_leaving_the_data_root_are_refused_named_and_skipped(tmp_path, caplog):
    csv_path = tmp_path / "split.csv"
    rows = [
        ("train/NORMAL/a.jpeg", "NORMAL"),
        ("../../etc/passwd", "NORMAL"),
        ("/etc/shadow", "PNEUMONIA"),
        ("train/../../../outside.jpeg", "PNEUMONIA"),
        ("train/PNEUMONIA/b.jpeg", "COVID"),
        ("home/user/private_scan.jpeg", "NORMAL"),
        ("train/PNEUMONIA/d.jpeg", "NORMAL"),
        ("train/NORMAL/notes.txt", "NORMAL"),
        ("train/PNEUMONIA/c.jpeg", "PNEUMONIA"),
    ]
    csv_path.write_text(
        "path,label,patient,split\n" + "".join(f"{p},{label},x,test\n" for p, label in rows)
    )
    data_root = tmp_path / "data"
    refused: dict[str, str] = {}
    items = collect_images(csv_path, tmp_path / "m.ckpt", data_root, refused)
    assert [i.path for i in items] == [
        data_root / "train/NORMAL/a.jpeg",
        data_root / "train/PNEUMONIA/c.jpeg",
    ]
    assert sorted(refused) == sorted(p for p, _ in rows[1:8])
    assert "below a NORMAL folder" in refused["home/user/private_scan.jpeg"]
    assert "below a NORMAL folder" in refused["train/PNEUMONIA/d.jpeg"]
    assert "not a .jpeg/.jpg/.png image" in refused["train/NORMAL/notes.txt"]
    assert "leaves the data root" in refused["../../etc/passwd"]
    assert "must be relative" in refused["/etc/shadow"]
    assert "'COVID'" in refused["train/PNEUMONIA/b.jpeg"]
    assert "/etc/shadow" in caplog.text and str(csv_path) in caplog.text


def test_a_split_file_with_only_refused_rows_is_an_error(tmp_path):
    csv_path = tmp_path / "split.csv"
    csv_path.write_text("path,label,patient,split\n/etc/passwd,NORMAL,x,test\n")
    with pytest.raises(ValueError, match="every 'test' image was refused"):
        collect_images(csv_path, tmp_path / "m.ckpt", tmp_path)


def test_a_recorded_data_root_must_look_like_a_dataset(tmp_path):
    from pneumonia.data.discovery import looks_like_a_dataset

    (tmp_path / "home" / "docs" / "Normal-ish").mkdir(parents=True)
    assert not looks_like_a_dataset(tmp_path / "home")
    assert not looks_like_a_dataset(tmp_path / "missing")
    (tmp_path / "chest_xray" / "train" / "NORMAL").mkdir(parents=True)
    assert looks_like_a_dataset(tmp_path / "chest_xray")
    assert not looks_like_a_dataset(tmp_path / "chest_xray", depth=1)


def test_a_folder_with_a_name_that_is_not_utf8_explains_the_others(tmp_path):
    import os

    (tmp_path / "NORMAL").mkdir()
    (tmp_path / "NORMAL" / "a.jpeg").write_bytes(b"x")
    with open(os.path.join(os.fsencode(tmp_path / "NORMAL"), b"b\xff.jpeg"), "wb") as f:
        f.write(b"x")
    refused: dict[str, str] = {}
    items = collect_images(tmp_path, tmp_path / "m.ckpt", tmp_path, refused)
    assert [i.path.name for i in items] == ["a.jpeg"]
    assert list(refused.values()) == ["the file name is not valid UTF-8; rename the file"]


def test_only_folders_at_or_below_the_given_one_name_a_class(tmp_path):
    """A checkout or a folder named pneumonia above the images says nothing about them."""
    scans = tmp_path / "pneumonia" / "my_scans"
    (scans / "NORMAL").mkdir(parents=True)
    (scans / "x.jpeg").write_bytes(b"x")
    (scans / "NORMAL" / "y.jpeg").write_bytes(b"x")
    items = collect_images(scans, tmp_path / "m.ckpt", tmp_path)
    assert [(i.path.name, i.label) for i in items] == [("y.jpeg", 0), ("x.jpeg", None)]
    assert collect_images(scans / "x.jpeg", tmp_path / "m.ckpt", tmp_path)[0].label is None
    # The folder given is one the user pointed at: it names its images' class.
    assert [i.label for i in collect_images(scans / "NORMAL", tmp_path / "m.ckpt", tmp_path)] == [0]


def test_a_link_back_to_a_parent_folder_is_walked_once(tmp_path):
    (tmp_path / "NORMAL").mkdir()
    (tmp_path / "NORMAL" / "a.jpeg").write_bytes(b"x")
    (tmp_path / "NORMAL" / "up").symlink_to("..")
    items = collect_images(tmp_path, tmp_path / "m.ckpt", tmp_path)
    assert [i.path for i in items] == [tmp_path / "NORMAL" / "a.jpeg"]
