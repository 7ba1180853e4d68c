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
