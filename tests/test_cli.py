"""The commands a user types: the installed console scripts and train.py's --help."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

SCRIPTS = Path(sys.executable).parent


def _run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, timeout=120)


def test_train_help_describes_the_groups_and_common_overrides(tmp_path):
    result = _run([sys.executable, str(ROOT / "train.py"), "--help"], tmp_path)
    assert result.returncode == 0, result.stderr
    for line in ("optimizer        adam (the study)", "hparams_search: lr, optuna, study_grid",
                 "hydra.sweep.dir=<sweep folder>", "== Common overrides =="):  # fmt: skip
        assert line in result.stdout


@pytest.mark.parametrize(
    "script, setting", [("explain.py", "figure_method=guided_gradcam"), ("predict.py", "output=")]
)
def test_explain_and_predict_help_describe_their_own_settings(script, setting, tmp_path):
    result = _run([sys.executable, str(ROOT / script), "--help"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "ckpt_path=<run folder or .ckpt>" in result.stdout and setting in result.stdout
    # train.py's groups do not apply to them (the checkpoint holds the model).
    assert "optimizer: adam" not in result.stdout and "scheduler:" not in result.stdout


@pytest.mark.parametrize("script", ["pneumonia-train", "pneumonia-explain", "pneumonia-predict"])
def test_console_scripts_find_the_config_tree_from_any_folder(script, tmp_path):
    path = SCRIPTS / script
    assert path.is_file(), f"{path} is missing: install the package (make install)"
    result = _run([str(path), "--cfg", "job"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "_target_" in result.stdout or "ckpt_path" in result.stdout


def test_the_compare_script_explains_a_missing_folder(tmp_path):
    result = _run([str(SCRIPTS / "pneumonia-compare"), str(tmp_path / "nowhere")], tmp_path)
    assert result.returncode == 2 and "nowhere" in result.stderr


def test_sigterm_unwinds_explain_and_predict_like_ctrl_c(tmp_path):
    """Their finally clauses run: a side file of an unfinished output is removed, exit 143."""
    script = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from pneumonia.cli import exit_on_sigterm\n"
        "from pneumonia.files import written_aside\n"
        "exit_on_sigterm()\n"
        f"with written_aside(Path({str(tmp_path / 'predictions.csv')!r})) as partial:\n"
        "    partial.write_text('half')\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 143, result.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_deliberate_error_of_a_single_run_prints_its_message_not_a_traceback(tmp_path):
    missing = tmp_path / "no_such_data"
    result = _run(
        [sys.executable, str(ROOT / "train.py"), f"data.root={missing}",
         f"hydra.run.dir={tmp_path / 'run'}"],
        tmp_path,
    )  # fmt: skip
    assert result.returncode == 1
    assert f"DataLayoutError: data root {missing} does not exist" in result.stderr
    assert "Traceback" not in result.stderr


def _raise_from_this_test() -> None:
    raise ValueError("a test's own error")


def test_only_errors_raised_on_purpose_by_the_package_lose_their_traceback():
    from hydra.errors import InstantiationException

    from pneumonia.cli import user_error_message
    from pneumonia.errors import CheckpointError
    from pneumonia.metrics.calibration import _nll, binary_nll

    with pytest.raises(ValueError) as deliberate:
        binary_nll([1.0], [1], temperature=0)  # a `raise` in the package
    assert user_error_message(deliberate.value) == "ValueError: temperature must be > 0, got 0"
    # The package's own error classes, wherever they are raised.
    assert user_error_message(CheckpointError("x.ckpt was refused")) == (
        "CheckpointError: x.ckpt was refused"
    )
    with pytest.raises(TypeError) as builtin_failure:
        _nll([0.0], "not numbers", 1.0)  # fails inside package code, but on no `raise` line
    assert user_error_message(builtin_failure.value) is None
    with pytest.raises(ValueError) as elsewhere:
        _raise_from_this_test()
    assert user_error_message(elsewhere.value) is None
    # A bare RuntimeError raised in the package marks a broken invariant: its traceback stays.
    from pneumonia.data.datamodule import ChestXrayDataModule

    with pytest.raises(RuntimeError, match="call setup") as invariant:
        ChestXrayDataModule(root="unused")._rows("val")
    assert user_error_message(invariant.value) is None
    assert user_error_message(CheckpointError("")) is None  # nothing to say without a traceback

    refused = ValueError("image_size=16 is too small")
    wrapped = InstantiationException(
        "Error in call to target 'pneumonia.model.study_cnn.StudyCNN':\n"
        "ValueError('image_size=16 is too small')\nfull_key: model.net"
    )
    wrapped.__cause__ = refused
    assert user_error_message(wrapped) == (
        "ValueError: image_size=16 is too small (building model.net)"
    )
    wrapped.__cause__ = AttributeError("a bug")
    assert user_error_message(wrapped) is None
