"""explain.py end to end on a real checkpoint trained on the real X-rays."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from pneumonia import CLASS_NAMES
from pneumonia.explain.run import UNFINISHED
from tests.integration.conftest import explain

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def explained(short_run, small_root, cache_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("explained") / "out"
    result = explain(
        f"ckpt_path={short_run}", f"run_dir={out}", "max_images=6", "trust.images=4",
        cache_dir=cache_dir,
    )  # fmt: skip
    return out, result


def test_figures_arrays_and_summary_are_written(explained):
    out, _ = explained
    figures = sorted((out / "figures").glob("*.png"))
    assert len(figures) == 6
    assert (out / "summary.png").stat().st_size > 10_000
    arrays = np.load(out / "attributions.npz")
    assert arrays["images"].shape == (6, 64, 64) and arrays["images"].dtype == np.uint8
    for method in ("guided_gradcam", "gradcam", "guided_backprop", "saliency"):
        maps = arrays[f"maps_{method}"]
        assert maps.shape == (6, 64, 64) and np.isfinite(maps).all()
    assert (arrays["maps_gradcam"] >= 0).all()  # ReLU'd Grad-CAM
    assert ((arrays["probabilities"] >= 0) & (arrays["probabilities"] <= 1)).all()
    assert set(arrays["labels"].tolist()) == {0, 1}  # the run's test split has both classes


def test_trust_report_is_printed_and_saved(explained):
    out, result = explained
    report = json.loads((out / "trust.json").read_text())
    assert report["checkpoint"].endswith(".ckpt") and "last" not in report["checkpoint"]
    assert set(report["ms_per_image"]) == {
        "guided_gradcam",
        "gradcam",
        "guided_backprop",
        "saliency",
    }
    assert set(report["sanity"]) == set(report["ms_per_image"])  # the loop below runs for each
    for steps in report["sanity"].values():
        # 3 convolutions + 2 linear layers, top first
        assert [s["randomized_through"] for s in steps][:2] == [
            "net.classifier.4",
            "net.classifier.1",
        ]
        assert len(steps) == 5
    assert set(report["deletion_auc"]) == {"random_order", *report["ms_per_image"]}
    # Per true class and the class its map explains (target=predicted: the decided class).
    stored = np.load(out / "attributions.npz")
    labelled = zip(stored["labels"], stored["targets"], strict=True)
    pairs = {(CLASS_NAMES[y], CLASS_NAMES[t]) for y, t in labelled}
    rows = report["regions"]["rows"]
    assert sorted((row["class"], row["explained"], row["sign"]) for row in rows) == sorted(
        (*pair, sign) for pair in pairs for sign in ("positive", "negative")
    )
    assert {row["class"] for row in rows} == {"NORMAL", "PNEUMONIA"}
    assert report["refused"] == {} and report["unreadable"] == {}
    for text in ("sanity check", "deletion AUC", "central"):
        assert text in result.stdout


def test_any_image_folder_with_bad_files_and_a_named_class(
    short_run, originals_root, cache_dir, tmp_path
):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for source in sorted((originals_root / "NORMAL").iterdir())[:2]:
        shutil.copy(source, folder / source.name)
    (folder / "broken.jpeg").write_bytes(b"\xff\xd8 not an image")
    out = tmp_path / "out"
    result = explain(
        f"ckpt_path={short_run / 'checkpoints' / 'last.ckpt'}", f"images={folder}", f"run_dir={out}",
        "target=NORMAL", "methods=[guided_gradcam]", "trust.sanity=false",
        cache_dir=cache_dir,
    )  # fmt: skip
    report = json.loads((out / "trust.json").read_text())
    assert report["images"] == 2 and list(report["unreadable"]) == [str(folder / "broken.jpeg")]
    assert np.load(out / "attributions.npz")["targets"].tolist() == [0, 0]
    assert "cannot read" in result.stdout + result.stderr


def test_a_folder_an_explanation_was_stopped_in_is_explained_again(
    short_run, originals_root, cache_dir, tmp_path
):
    out = tmp_path / "out"
    (out / "figures").mkdir(parents=True)
    # And no trust.json; the side file's pid (1) lives, so only explain's own cleanup removes it.
    stopped = [
        "summary.png",
        "attributions.npz",
        "figures/0007_old.png",
        "figures/.0008_x.png.1.partial",
    ]
    for name in [*stopped, UNFINISHED]:
        (out / name).write_bytes(b"cut short by a kill")
    image = sorted((originals_root / "NORMAL").iterdir())[0]
    result = explain(
        f"ckpt_path={short_run}", f"images={image}", f"run_dir={out}",
        "methods=[guided_gradcam]", "trust.sanity=false",
        cache_dir=cache_dir,
    )  # fmt: skip
    assert "stopped before it finished" in result.stdout + result.stderr
    assert [p.name for p in (out / "figures").iterdir()] == [f"0000_{image.stem}.png"]
    assert np.load(out / "attributions.npz")["images"].shape[0] == 1
    report = json.loads((out / "trust.json").read_text())
    assert report["images"] == 1 and report["request"]["images"] == str(image)
    assert report["request"]["methods"] == ["guided_gradcam"]
    assert not (out / UNFINISHED).exists()


def test_a_foreign_checkpoint_is_refused_clearly(cache_dir, tmp_path):
    other = tmp_path / "other.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"lr": 1}}, other)
    result = explain(
        f"ckpt_path={other}", f"run_dir={tmp_path / 'out'}", cache_dir=cache_dir, check=False
    )
    assert result.returncode != 0
    assert "is not a pneumonia XrayClassifier checkpoint" in result.stderr
    missing = explain(
        f"ckpt_path={tmp_path / 'nope.ckpt'}",
        f"run_dir={tmp_path / 'o2'}",
        cache_dir=cache_dir,
        check=False,
    )
    assert "nope.ckpt does not exist" in missing.stderr
