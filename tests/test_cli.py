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
