"""explain.py's folder: one explanation per folder, one process at a time."""

from __future__ import annotations

import pytest

from pneumonia.errors import RunFolderBusyError
from pneumonia.explain.run import explain_checkpoint
from tests.conftest import run_folder_held_elsewhere


@pytest.mark.parametrize("earlier", ["trust.json", "summary.png", "figures/0000_a.png"])
def test_a_folder_holding_an_earlier_explanation_is_refused_before_anything_loads(
    compose_config, tmp_path, earlier
):
    cfg = compose_config("ckpt_path=missing.ckpt", config_name="explain")
    done = tmp_path / "run" / earlier
    done.parent.mkdir(parents=True)
    done.write_text("from the first explanation")
    with pytest.raises(
        FileExistsError,
        match=rf"run[/\\]? already holds an explanation \({earlier.split('/')[0]}\).*run_dir=",
    ):
        explain_checkpoint(cfg)
    assert done.read_text() == "from the first explanation"


def test_a_folder_another_process_explains_in_is_refused(compose_config, tmp_path):
    cfg = compose_config("ckpt_path=missing.ckpt", config_name="explain")
    (tmp_path / "run").mkdir()
    with (
        run_folder_held_elsewhere(tmp_path / "run") as holder,
        pytest.raises(RunFolderBusyError, match=f"pid {holder.pid}"),
    ):
        explain_checkpoint(cfg)
