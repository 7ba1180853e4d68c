"""predict.py's task on tiny synthetic checkpoints and images: the CSVs, decisions, inputs, errors."""

from __future__ import annotations

import csv
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from pneumonia.data.image_io import load_grayscale
from pneumonia.errors import CheckpointError, ConfigError, NonFiniteOutputError
from pneumonia.model.classifier import XrayClassifier
from pneumonia.predict.inputs import collect_inputs
from pneumonia.predict.run import format_threshold, predict_images

SIZE = 32
NET = {
    "_target_": "pneumonia.model.study_cnn.StudyCNN",
    "image_size": SIZE,
    "channels": [4, 8, 8],
    "hidden_features": 8,
    "dropout": 0.0,
    "head_dropout": 0.0,
}
ADAM = {"_target_": "torch.optim.Adam", "lr": 1e-3}


def save_checkpoint(path: Path, threshold: float, constant: bool = False, **callbacks) -> Path:
    """A Lightning-format checkpoint of a tiny XrayClassifier; ``constant``: P = 0.5 for any image."""
    torch.manual_seed(0)
    module = XrayClassifier(net=NET, optimizer=ADAM, image_size=SIZE, threshold=threshold)
    if constant:
        with torch.no_grad():
            for parameter in module.net.parameters():
                parameter.zero_()  # logit 0 -> sigmoid exactly 0.5
    else:
        with torch.no_grad():  # large enough weights that images of different brightness differ
            for parameter in module.net.parameters():
                parameter.mul_(4.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "state_dict": module.state_dict(),
            "hyper_parameters": dict(module.hparams),
            "pytorch-lightning_version": L.__version__,
            "callbacks": callbacks,
        },
        path,
    )
    return path


def gradient_image(path: Path, level: int, size=(48, 48), mode="L") -> Path:
    """A smooth image whose brightness depends on ``level`` (so the network scores it differently)."""
    height, width = size[1], size[0]
    ramp = np.linspace(0, 1, width)[None, :] * np.linspace(0.2, 1, height)[:, None]
    gray = (ramp * (40 + 5 * level) + 3 * level).clip(0, 255).astype(np.uint8)
    image = Image.fromarray(gray)
    if mode != "L":
        image = image.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def independent_probability(ckpt: Path, image: Path) -> float:
    module = XrayClassifier.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True)
    return float(module.predict_proba(np.array(load_grayscale(image, SIZE)))[0])


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.ckpt", threshold=0.4)


@pytest.fixture(scope="module")
def constant_ckpt(tmp_path_factory) -> Path:
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "half.ckpt", 0.5, constant=True)


@pytest.fixture
def predict(compose_config):
    def _predict(*overrides: str):
        cfg = compose_config("progress=false", *overrides, config_name="predict")
        return predict_images(cfg), Path(cfg.paths.output_dir)

    return _predict


@pytest.fixture
def folder(tmp_path) -> Path:
    """Labelled images at two depths, an unlabelled one and a file that is not an image."""
    root = tmp_path / "images"
    for i, rel in enumerate(
        [
            "PNEUMONIA/p2.png",
            "NORMAL/n1.jpeg",
            "PNEUMONIA/deeper/p1.jpg",
            "loose.png",
            "NORMAL/n0.png",
            "a/zz.JPEG",
        ]
    ):
        gradient_image(root / rel, level=7 * i)
    (root / "NORMAL" / "notes.txt").write_text("not an image")
    return root


def test_csv_columns_rows_order_and_probabilities(predict, ckpt, folder):
    report, out = predict(f"ckpt_path={ckpt}", f"images={folder}", "batch_size=4")
    columns, rows = read_csv(out / "predictions.csv")
    assert columns == ["path", "p_pneumonia", "decision", "threshold", "label"]
    expected = sorted(
        ["PNEUMONIA/p2.png", "NORMAL/n1.jpeg", "PNEUMONIA/deeper/p1.jpg", "loose.png",
         "NORMAL/n0.png", "a/zz.JPEG"]
    )  # fmt: skip
    assert [row["path"] for row in rows] == [str(folder / rel) for rel in expected]
    assert [row["label"] for row in rows] == [
        "NORMAL",
        "NORMAL",
        "PNEUMONIA",
        "PNEUMONIA",
        "",
        "",
    ]  # fmt: skip  (NORMAL/n0, NORMAL/n1, PNEUMONIA/deeper/p1, PNEUMONIA/p2, a/zz, loose)
    assert {row["threshold"] for row in rows} == {"0.4"}
    for row, prediction in zip(rows, report.predictions, strict=True):
        assert float(row["p_pneumonia"]) == prediction.probability  # written in full
        # Each row's probability is its own image's, whatever batch it was scored in.
        alone = independent_probability(ckpt, Path(row["path"]))
        # (A batch and a single image may differ in the last float32 digits.)
        assert float(row["p_pneumonia"]) == pytest.approx(alone, abs=5e-5)
        assert prediction.probability == pytest.approx(alone, abs=5e-5)
        assert row["decision"] == ("PNEUMONIA" if prediction.probability >= 0.4 else "NORMAL")
    gaps = np.diff(sorted(p.probability for p in report.predictions))
    assert gaps.min() > 2e-4  # the images are told apart, well beyond the tolerance above
    assert read_csv(out / "unreadable.csv") == (["path", "reason"], [])


def test_decision_is_pneumonia_at_or_above_the_threshold(predict, constant_ckpt, folder):
    stored, out = predict(f"ckpt_path={constant_ckpt}", f"images={folder}")
    _, rows = read_csv(out / "predictions.csv")
    assert {(row["p_pneumonia"], row["decision"], row["threshold"]) for row in rows} == {
        ("0.5", "PNEUMONIA", "0.5")
    }  # P = 0.5 exactly, stored threshold 0.5: at the threshold is PNEUMONIA
    assert stored.threshold_source == "stored in the checkpoint"
    above = math.nextafter(0.5, 1.0)
    raised, out = predict(f"ckpt_path={constant_ckpt}", f"images={folder}", f"threshold={above!r}")
    assert {p.decision for p in raised.predictions} == {"NORMAL"}
    _, rows = read_csv(out / "predictions.csv")
    assert {row["decision"] for row in rows} == {"NORMAL"}
    assert {row["threshold"] for row in rows} == {repr(above)}


def test_threshold_override_is_used_and_written(predict, ckpt, folder, caplog):
    first, _ = predict(f"ckpt_path={ckpt}", f"images={folder}")
    probabilities = sorted(p.probability for p in first.predictions)
    middle = (probabilities[2] + probabilities[3]) / 2  # three images on each side
    with caplog.at_level(logging.INFO, logger="pneumonia.predict"):
        report, out = predict(f"ckpt_path={ckpt}", f"images={folder}", f"threshold={middle!r}")
    _, rows = read_csv(out / "predictions.csv")
    assert {row["threshold"] for row in rows} == {repr(middle)}
    assert sorted(row["decision"] for row in rows) == ["NORMAL"] * 3 + ["PNEUMONIA"] * 3
    assert report.threshold == middle and report.threshold_source == "threshold= override"
    assert f"3 PNEUMONIA at threshold {middle!r} (threshold= override)" in caplog.text


def test_unreadable_files_are_listed_not_fatal(predict, ckpt, tmp_path, caplog):
    root = tmp_path / "mixed"
    good = gradient_image(root / "good.png", level=3)
    (root / "text.jpeg").write_text("this is not a JPEG\n")
    (root / "zero.png").write_bytes(b"")
    tiny = gradient_image(root / "tiny.png", level=1, size=(8, 8))
    os.mkfifo(root / "pipe.png")  # refused from its stat, never opened (it would block)
    with open(os.path.join(os.fsencode(root), b"bad\xffname.png"), "wb") as f:
        f.write(good.read_bytes())
    with caplog.at_level(logging.INFO, logger="pneumonia.predict"):
        report, out = predict(f"ckpt_path={ckpt}", f"images={root}", "num_workers=2")
    _, rows = read_csv(out / "predictions.csv")
    assert [row["path"] for row in rows] == [str(good)]
    assert "label" not in rows[0]  # no path names a class: no label column
    columns, unreadable = read_csv(out / "unreadable.csv")
    reasons = {row["path"]: row["reason"] for row in unreadable}
    assert columns == ["path", "reason"]
    assert reasons[str(root / "text.jpeg")] == "UnidentifiedImageError: not a JPEG or PNG image"
    assert reasons[str(root / "zero.png")] == "UnidentifiedImageError: an empty file"
    assert reasons[str(tiny)].startswith("ImageTooSmallError")
    assert "FIFO" in reasons[str(root / "pipe.png")]
    assert "not valid UTF-8" in reasons[repr(str(root / os.fsdecode(b"bad\xffname.png")))]
    assert len(report.unreadable) == 5
    assert "predicted 1 image: " in caplog.text and "5 unreadable" in caplog.text


def test_nothing_readable_writes_the_list_then_fails(predict, ckpt, tmp_path, compose_config):
    (tmp_path / "only").mkdir()
    (tmp_path / "only" / "text.jpeg").write_text("no")
    with pytest.raises(ValueError, match=r"none of the 1 images .* could be read"):
        predict(f"ckpt_path={ckpt}", f"images={tmp_path / 'only'}")
    _, rows = read_csv(tmp_path / "run" / "unreadable.csv")
    assert [row["path"] for row in rows] == [str(tmp_path / "only" / "text.jpeg")]


def test_rgb_odd_sized_16_bit_and_transparent_images_are_accepted(predict, ckpt, tmp_path):
    root = tmp_path / "odd"
    rgb = gradient_image(root / "rgb.jpeg", level=5, size=(90, 50), mode="RGB")
    rgba = gradient_image(root / "rgba.png", level=9, size=(33, 70), mode="RGBA")
    wide = root / "wide16.png"
    Image.fromarray((np.arange(40 * 37).reshape(37, 40) * 40).astype(np.uint16)).save(wide)
    assert Image.open(wide).mode.startswith("I")
    # No decoding threads, and batches of two: the last batch is partial.
    report, out = predict(f"ckpt_path={ckpt}", f"images={root}", "num_workers=0", "batch_size=2")
    _, rows = read_csv(out / "predictions.csv")
    assert [row["path"] for row in rows] == [str(rgb), str(rgba), str(wide)]
    for row in rows:
        assert float(row["p_pneumonia"]) == pytest.approx(
            independent_probability(ckpt, Path(row["path"])), abs=5e-5
        )
    assert report.unreadable == {}


def test_one_file_a_list_and_a_custom_output(predict, ckpt, folder, tmp_path):
    one = folder / "NORMAL" / "n1.jpeg"
    report, run = predict(f"ckpt_path={ckpt}", f"images={one}")
    assert [(str(p.image.path), p.image.label) for p in report.predictions] == [
        (str(one), "NORMAL")
    ]
    (run / "predictions.csv").unlink()
    listing = folder / "list.txt"
    listing.write_text(
        "# chosen images, in this order\nloose.png\n\nPNEUMONIA/p2.png\nmissing.png\n"
        f"{folder / 'NORMAL' / 'n0.png'}\n"
    )
    output = tmp_path / "elsewhere" / "mine.csv"
    predict(f"ckpt_path={ckpt}", f"images={listing}", f"output={output}")
    _, rows = read_csv(output)
    assert [row["path"] for row in rows] == [
        str(folder / "loose.png"),
        str(folder / "PNEUMONIA" / "p2.png"),
        str(folder / "NORMAL" / "n0.png"),
    ]  # fmt: skip  (the list's order, not sorted)
    assert [row["label"] for row in rows] == ["", "PNEUMONIA", "NORMAL"]
    _, unreadable = read_csv(tmp_path / "elsewhere" / "mine_unreadable.csv")
    assert [row["path"] for row in unreadable] == [str(folder / "missing.png")]
    assert "No such file" in unreadable[0]["reason"]
    assert not (run / "predictions.csv").exists()
    predict(f"ckpt_path={ckpt}", f"images={one}", f"output={output}")  # its own CSV: replaced
    assert len(read_csv(output)[1]) == 1


def test_what_a_killed_predict_left_beside_its_output_is_cleared(predict, ckpt, folder, tmp_path):
    # SIGKILL while writing leaves written_aside's hidden side files; nothing else removes them.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    output = tmp_path / "out" / "mine.csv"
    output.parent.mkdir()
    leftovers = [
        output.parent / f".{name}.{dead.pid}.partial"
        for name in ("mine.csv", "mine_unreadable.csv")
    ]
    unrelated = output.parent / f".other.csv.{dead.pid}.partial"
    for path in (*leftovers, unrelated):
        path.write_text("half")
    predict(f"ckpt_path={ckpt}", f"images={folder}", f"output={output}")
    assert sorted(p.name for p in output.parent.iterdir()) == sorted(
        ["mine.csv", "mine_unreadable.csv", unrelated.name]
    )


def test_an_output_that_is_some_other_file_is_left_alone(predict, ckpt, folder, tmp_path):
    split = tmp_path / "run" / "split.csv"
    split.parent.mkdir()
    split.write_text("path,split,label\nNORMAL/a.jpeg,train,0\n")
    with pytest.raises(ConfigError, match=f"output={split} exists and is not a predictions CSV"):
        predict(f"ckpt_path={ckpt}", f"images={folder}", f"output={split}")
    assert split.read_text() == "path,split,label\nNORMAL/a.jpeg,train,0\n"


def test_a_folder_above_the_given_images_gives_no_label(tmp_path):
    # A checkout or project folder called "pneumonia" says nothing about the scans inside it.
    scans = tmp_path / "pneumonia" / "my_scans"
    gradient_image(scans / "a.png", level=10)
    gradient_image(scans / "NORMAL" / "b.png", level=20)
    listing = tmp_path / "pneumonia" / "list.txt"
    listing.write_text("my_scans/a.png\nmy_scans/NORMAL/b.png\n")
    for given in (scans, listing, scans / "a.png"):
        labels = {item.path.name: item.label for item in collect_inputs(given).images}
        assert labels["a.png"] is None
        assert labels.get("b.png", "NORMAL") == "NORMAL"
    assert [item.label for item in collect_inputs(scans / "NORMAL").images] == ["NORMAL"]


def test_missing_or_empty_inputs_are_clear_errors(tmp_path):
    with pytest.raises(
        FileNotFoundError, match=r"images=.*nowhere: no such file or folder; pass images=<an image"
    ):
        collect_inputs(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.md").write_text("x")
    with pytest.raises(FileNotFoundError, match=r"no \.jpeg, \.jpg or \.png images below"):
        collect_inputs(tmp_path / "empty")
    (tmp_path / "blank.txt").write_text("# nothing\n\n")
    with pytest.raises(FileNotFoundError, match="the list names no image path"):
        collect_inputs(tmp_path / "blank.txt")


def test_a_run_folder_means_its_best_checkpoint(predict, tmp_path, folder):
    checkpoints = tmp_path / "some_run" / "checkpoints"
    best = save_checkpoint(checkpoints / "epoch01-bacc0.9000.ckpt", threshold=0.3)
    state = {"best_model_path": "/moved/epoch01-bacc0.9000.ckpt", "dirpath": "/moved"}
    save_checkpoint(checkpoints / "last.ckpt", threshold=0.7, **{"ModelCheckpoint{}": state})
    report, _ = predict(f"ckpt_path={tmp_path / 'some_run'}", f"images={folder}")
    assert report.checkpoint == best and format_threshold(report.threshold) == "0.3"


def test_missing_and_foreign_checkpoints_raise_checkpoint_errors(predict, tmp_path, folder):
    with pytest.raises(CheckpointError, match=r"nope\.ckpt does not exist"):
        predict(f"ckpt_path={tmp_path / 'nope.ckpt'}", f"images={folder}")
    other = tmp_path / "other.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"lr": 1}}, other)
    with pytest.raises(CheckpointError, match="other.ckpt is not a pneumonia XrayClassifier"):
        predict(f"ckpt_path={other}", f"images={folder}")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("batch_size=0", r"batch_size=0 must be a whole number of at least 1"),
        ("batch_size=2.5", r"batch_size=2\.5 must be a whole number"),
        ("threshold=1.5", r"threshold=1\.5 must be a probability in \[0, 1\]"),
        ("threshold=-0.1", r"threshold=-0\.1 must be a probability"),
        ("threshold=nan", r"threshold=nan must be a probability"),
        ("threshold=high", r"threshold='high' must be a probability"),
        ("num_workers=-1", r"num_workers=-1 must be a whole number of at least 0"),
        ("device=tpu", r"device='tpu' must be one of auto, cpu, cuda"),
        ("ckpt_path=last", r"ckpt_path=last resumes training"),
        ("images=null", r"images is required; images=<an image file>"),
        ("output=model.ckpt", r"output=model\.ckpt must be a \.csv file"),
        ("output=child.jpeg", r"output=child\.jpeg must be a \.csv file"),
    ],
)
def test_bad_config_values_are_refused_naming_the_key(predict, ckpt, folder, override, message):
    with pytest.raises(ConfigError, match=message):
        predict(f"ckpt_path={ckpt}", f"images={folder}", override)


def test_missing_required_keys_and_an_absent_gpu(compose_config, ckpt, folder):
    with pytest.raises(ConfigError, match=r"ckpt_path is required; ckpt_path=<file\.ckpt>"):
        predict_images(compose_config(f"images={folder}", config_name="predict"))
    with pytest.raises(ConfigError, match="images is required"):
        predict_images(compose_config(f"ckpt_path={ckpt}", config_name="predict"))
    if not torch.cuda.is_available():
        cfg = compose_config(f"ckpt_path={ckpt}", f"images={folder}", "device=cuda", config_name="predict")  # fmt: skip
        with pytest.raises(ConfigError, match="device=cuda but this machine has no CUDA GPU"):
            predict_images(cfg)


def test_a_non_finite_probability_stops_the_run(predict, ckpt, folder, monkeypatch):
    def nan_for_all(self, images):
        return torch.full((len(images),), float("nan"))

    monkeypatch.setattr(XrayClassifier, "predict_proba", nan_for_all)
    with pytest.raises(NonFiniteOutputError, match=r"P\(PNEUMONIA\)=nan for .*n0\.png"):
        predict(f"ckpt_path={ckpt}", f"images={folder}")
    assert not (folder.parent / "run" / "predictions.csv").exists()  # no complete-looking CSV


def test_threshold_text():
    assert format_threshold(float(torch.tensor(0.4))) == "0.4"  # as a checkpoint stores it
    assert format_threshold(0.5) == "0.5" and format_threshold(1) == "1.0"
    assert format_threshold(0.123456789) == "0.123456789"
