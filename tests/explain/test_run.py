"""explain.py's folder: one explanation per folder, one process at a time."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pneumonia.errors import CheckpointError, RunFolderBusyError
from pneumonia.explain.inputs import ImageToExplain
from pneumonia.explain.run import (
    UNFINISHED,
    _start_writing,
    _stopped_explanation_files,
    explain_checkpoint,
    load_pixels,
)
from tests.conftest import run_folder_held_elsewhere


def _folder_holding(tmp_path: Path, *names: str, text: str = "of the earlier run") -> Path:
    run = tmp_path / "run"
    (run / "figures").mkdir(parents=True)
    for name in names:
        (run / name).write_text(text)
    return run


@pytest.mark.parametrize("earlier", ["trust.json", "figures/0000_a.png"])
def test_a_folder_holding_a_finished_explanation_is_refused_before_anything_loads(
    compose_config, tmp_path, earlier
):
    cfg = compose_config("ckpt_path=missing.ckpt", config_name="explain")
    done = _folder_holding(tmp_path, earlier, "trust.json", text="from the first explanation")
    with pytest.raises(FileExistsError, match=r"run[/\\]? already holds an explanation .*run_dir="):
        explain_checkpoint(cfg)
    assert (done / earlier).read_text() == "from the first explanation"


def test_a_stopped_explanations_files_are_removed_when_the_next_one_writes(
    compose_config, tmp_path, caplog
):
    # They were refused like a finished explanation's: a run killed while drawing its figures
    # could not be run again in its folder.
    cfg = compose_config("ckpt_path=missing.ckpt", config_name="explain")
    names = [
        "summary.png",
        "attributions.npz",
        "figures/0522_x.png",
        "figures/.0523_y.png.1.partial",
    ]
    run = _folder_holding(tmp_path, *names, UNFINISHED, "notes.txt")
    # A rerun that fails before it writes leaves the folder as it found it.
    with pytest.raises(CheckpointError, match="missing.ckpt"):  # past the folder's checks
        explain_checkpoint(cfg)
    assert all((run / name).exists() for name in [*names, UNFINISHED])
    # One that writes removes the stopped run's files first, and only those.
    _start_writing(run, _stopped_explanation_files(run))
    assert not any((run / name).exists() for name in names) and (run / "notes.txt").is_file()
    assert (run / UNFINISHED).is_file() and "stopped before it finished" in caplog.text


@pytest.mark.parametrize(
    "names",
    [["figures/2023_loss_curve.png", "figures/2024_results.png"], ["summary.png"]],
)
def test_files_by_explains_names_that_no_explanation_left_are_refused_not_removed(
    compose_config, tmp_path, names
):
    # A user's 2023_loss_curve.png passed for a stopped explanation's figure and was deleted.
    cfg = compose_config("ckpt_path=missing.ckpt", config_name="explain")
    run = _folder_holding(tmp_path, *names, text="the user's")
    with pytest.raises(FileExistsError, match=r"no explanation left unfinished there .*run_dir="):
        explain_checkpoint(cfg)
    assert all((run / name).read_text() == "the user's" for name in names)


@pytest.mark.parametrize(
    "stranger",
    ["figures/notes.txt", "figures/0001_x.png/", "attributions.npz/", "summary.png/", "figures"],
)
def test_files_explain_did_not_write_where_it_writes_are_refused_before_anything_is_removed(
    compose_config, tmp_path, stranger
):
    # A folder named attributions.npz failed with a bare IsADirectoryError after summary.png was
    # already removed.
    cfg = compose_config("ckpt_path=missing.ckpt", config_name="explain")
    run = tmp_path / "run"
    run.mkdir()
    for name in (UNFINISHED, "summary.png", "attributions.npz"):
        (run / name).write_text("of the stopped run")
    path = run / stranger.rstrip("/")
    path.unlink(missing_ok=True)
    path.parent.mkdir(exist_ok=True)
    path.mkdir() if stranger.endswith("/") else path.write_text("the user's")
    with pytest.raises(FileExistsError, match=rf"{path.name} is (not a file explain.py|a file)"):
        explain_checkpoint(cfg)
    assert path.exists()
    assert all((run / name).exists() for name in ("summary.png", "attributions.npz"))


def test_a_marker_that_is_no_file_is_refused(compose_config, tmp_path):
    cfg = compose_config("ckpt_path=missing.ckpt", config_name="explain")
    (tmp_path / "run" / UNFINISHED).mkdir(parents=True)
    with pytest.raises(FileExistsError, match=r"explain_unfinished is not explain.py's marker"):
        explain_checkpoint(cfg)


@pytest.mark.parametrize("target", ["another explanation's figures", "nothing"])
def test_a_figures_folder_that_is_a_symbolic_link_is_refused(compose_config, tmp_path, target):
    # Through it, another (finished) explanation's figures were removed and replaced.
    cfg = compose_config("ckpt_path=missing.ckpt", config_name="explain")
    other = tmp_path / "other" / "figures"
    if target != "nothing":
        other.mkdir(parents=True)
        (other / "0000_a.png").write_text("of the other explanation")
    run = tmp_path / "run"
    run.mkdir()
    (run / UNFINISHED).write_text("{}")
    (run / "figures").symlink_to(other, target_is_directory=True)
    with pytest.raises(FileExistsError, match=r"figures is a symbolic link.*run_dir="):
        explain_checkpoint(cfg)
    assert target == "nothing" or (other / "0000_a.png").is_file()


def test_a_folder_another_process_explains_in_is_refused(compose_config, tmp_path):
    cfg = compose_config("ckpt_path=missing.ckpt", config_name="explain")
    (tmp_path / "run").mkdir()
    with (
        run_folder_held_elsewhere(tmp_path / "run") as holder,
        pytest.raises(RunFolderBusyError, match=f"pid {holder.pid}"),
    ):
        explain_checkpoint(cfg)


def test_images_missing_from_the_data_root_say_to_pass_data_root(tmp_path):
    items = [ImageToExplain(tmp_path / "moved" / "NORMAL" / f"{i}.jpeg", 0) for i in range(3)]
    with pytest.raises(
        ValueError, match=r"none of the 3 images exists under the data root .*data_root="
    ):
        load_pixels(items, 32, tmp_path / "moved")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    broken = [ImageToExplain(tmp_path / "broken.png", 0)]
    with pytest.raises(ValueError, match="none of the 1 images could be read"):
        load_pixels(broken, 32, tmp_path)


def test_maps_with_nan_or_infinite_values_stop_the_run_naming_the_images():
    # Captum's visualiser failed on them with an IndexError; the pixel figures drew them black.
    from pneumonia.errors import NonFiniteOutputError
    from pneumonia.explain.run import _check_finite

    items = [ImageToExplain(Path(f"/x/{name}.png"), 0) for name in ("a", "b", "c")]
    maps = torch.zeros(3, 1, 8, 8)
    _check_finite(maps, "gradcam", items)
    maps[1, 0, 2, 2], maps[2, 0, 0, 0] = float("nan"), float("inf")
    with pytest.raises(
        NonFiniteOutputError, match=r"gradcam gave .* for 2 of 3 images \(b.png, c.png\)"
    ):
        _check_finite(maps, "gradcam", items)
