"""The two ways a summary gets written: ``python -m pneumonia.compare`` on demand, and the Hydra
callback at the end of a sweep (which must never fail the sweep)."""

from __future__ import annotations

import logging
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from pneumonia.compare import main
from pneumonia.sweeps import summary as summary_module
from pneumonia.sweeps.callback import SummarizeSweep
from pneumonia.sweeps.summary import SEED_CSV, SUMMARY_CSV, SUMMARY_MD
from tests.sweeps.test_summary import ERROR, read_csv, write_run

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    folder = tmp_path / "sweep"
    write_run(folder / "a", overrides=["optimizer.lr=0.1"], score=0.90)
    write_run(folder / "b", overrides=["optimizer.lr=0.01"], score=0.95)
    write_run(folder / "c", overrides=["optimizer.lr=0.001"], score=0.85)
    write_run(folder / "d", status="failed", overrides=["optimizer.lr=10"], error=ERROR)
    return folder


def test_prints_the_markdown_table_and_writes_the_files(runs, capsys):
    assert main([str(runs)]) == 0
    out = capsys.readouterr().out
    assert out == (runs / SUMMARY_MD).read_text()
    lines = [line for line in out.splitlines() if line.startswith("| ")]
    assert [line.split(" | ")[2] for line in lines[1:]] == ["0.01", "0.1", "0.001", "10"]
    assert "failed: TrainingDivergedError" in lines[-1]
    assert (runs / SUMMARY_CSV).is_file() and (runs / "summary_optimizer.lr.png").is_file()


def test_metric_and_mode_change_the_ranking(runs, capsys):
    assert main([str(runs), "--metric", "val/auroc", "--mode", "min", "--no-plots"]) == 0
    assert [row["folder"] for row in read_csv(runs / SUMMARY_CSV)] == ["c", "a", "b", "d"]
    assert "ranked by **val/auroc** (min)" in capsys.readouterr().out
    assert not list(runs.glob("*.png"))


def test_output_goes_where_asked(runs, tmp_path):
    assert main([str(runs), "--output", str(tmp_path / "report")]) == 0
    assert (tmp_path / "report" / SUMMARY_MD).is_file()
    assert not (runs / SUMMARY_MD).exists()
    # Folders stay relative to the folder that was summarised.
    assert {row["folder"] for row in read_csv(tmp_path / "report" / SUMMARY_CSV)} == set("abcd")


@pytest.mark.parametrize(
    ("name", "message"),
    [("missing", "does not exist"), ("empty", "holds no run folder"), ("file.txt", "is a file")],
)
def test_nothing_to_compare_exits_2_naming_the_path_and_the_fix(tmp_path, capsys, name, message):
    path = tmp_path / name
    if name == "empty":
        (path / "logs").mkdir(parents=True)
    elif name == "file.txt":
        path.write_text("x")
    assert main([str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err and str(path) in err
    assert "outputs/multiruns" in err or "folder that holds the runs" in err


def test_an_unknown_metric_exits_2_listing_the_available(runs, capsys):
    assert main([str(runs), "--metric", "val/nonsense"]) == 2
    err = capsys.readouterr().err
    assert "'val/nonsense'" in err and "val_best/balanced_accuracy" in err
    assert not (runs / SUMMARY_MD).exists()


def test_a_bad_mode_is_an_argparse_error(runs):
    with pytest.raises(SystemExit) as raised:
        main([str(runs), "--mode", "best"])
    assert raised.value.code == 2


def test_runs_as_a_module_without_importing_matplotlib_until_it_draws(runs):
    result = subprocess.run(
        [sys.executable, "-m", "pneumonia.compare", str(runs), "--no-plots"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("# Runs in")
    # The callback is unpickled into every launcher process, and the CLI should answer in a
    # second: neither may import torch (seconds) or matplotlib. The CLI imported torch through the
    # config resolvers.
    probe = (
        "import pickle, sys; import pneumonia.compare, pneumonia.sweeps.summary; "
        "from pneumonia.sweeps.callback import SummarizeSweep; "
        "c = pickle.loads(pickle.dumps(SummarizeSweep(metric='val/auroc'))); "
        "assert c.metric == 'val/auroc'; "
        "heavy = [m for m in ('matplotlib', 'torch') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    probed = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert probed.returncode == 0, probed.stderr


def test_the_callback_summarises_the_sweep_folder(runs, caplog):
    config = OmegaConf.create(
        {"hydra": {"sweep": {"dir": runs.name}, "runtime": {"cwd": str(runs.parent)}}}
    )
    with caplog.at_level(logging.INFO, logger="pneumonia"):
        SummarizeSweep().on_multirun_end(config)
    assert (runs / SUMMARY_MD).is_file() and (runs / SUMMARY_CSV).is_file()
    assert str(runs / SUMMARY_MD) in caplog.text and "first: b" in caplog.text
    assert pickle.loads(pickle.dumps(SummarizeSweep())).after_each_job


def test_summaries_of_jobs_ending_together_are_written_one_at_a_time(runs):
    # Another job's summary, begun earlier on older statuses, is still being written: this one
    # waits for it, so the table left behind is the newest, not whichever finished last.
    from pneumonia.sweeps.callback import SUMMARY_LOCK

    older = textwrap.dedent(f"""
        import fcntl, os, time
        fd = os.open({str(runs / SUMMARY_LOCK)!r}, os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX)
        print("writing", flush=True)
        time.sleep(1.5)
        open({str(runs / SUMMARY_MD)!r}, "w").write("stale")
    """)
    writer = subprocess.Popen([sys.executable, "-c", older], stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "writing"
    config = OmegaConf.create(
        {"hydra": {"sweep": {"dir": runs.name}, "runtime": {"cwd": str(runs.parent)}}}
    )
    SummarizeSweep().on_multirun_end(config)
    writer.wait()
    assert (runs / SUMMARY_MD).read_text().startswith("# Runs in")


def test_the_callback_never_raises(tmp_path, caplog, monkeypatch):
    missing = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path / "gone")}}})
    with caplog.at_level(logging.WARNING, logger="pneumonia"):
        SummarizeSweep().on_multirun_end(missing)
        SummarizeSweep().on_multirun_end(OmegaConf.create({}))
        SummarizeSweep().on_multirun_end(
            OmegaConf.create({"hydra": {"sweep": {"dir": "${oc.env:PNEUMONIA_NO_SUCH_VAR}"}}})
        )
    assert "does not exist" in caplog.text
    assert "no hydra.sweep.dir" in caplog.text
    assert "PNEUMONIA_NO_SUCH_VAR" in caplog.text

    write_run(tmp_path / "sweep" / "a", score=0.9)

    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(summary_module, "summarize", broken)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pneumonia"):
        config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path / "sweep")}}})
        SummarizeSweep().on_multirun_end(config)
    assert "RuntimeError: disk on fire" in caplog.text
    assert "python -m pneumonia.compare" in caplog.text


def test_after_a_single_run_the_callback_writes_nothing(tmp_path):
    # A sweep folder that holds runs, so only the single-run check can keep it from summarising.
    write_run(tmp_path / "multiruns" / "x" / "0", score=0.8)
    write_run(tmp_path / "runs" / "one", score=0.9)

    def job_end(output_dir: Path) -> None:
        sweep = {"dir": str(tmp_path / "multiruns" / "x")}
        runtime = {"output_dir": str(output_dir)}
        config = OmegaConf.create({"hydra": {"sweep": sweep, "runtime": runtime}})
        SummarizeSweep().on_job_end(config, job_return=None)

    job_end(tmp_path / "runs" / "one")
    assert not list(tmp_path.rglob(SUMMARY_MD))
    job_end(tmp_path / "multiruns" / "x" / "0")  # a sweep's job: summarised
    assert (tmp_path / "multiruns" / "x" / SUMMARY_MD).is_file()


APP = """
import json
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig


@hydra.main(version_base="1.3", config_path=".", config_name="app")
def main(cfg):
    out = Path(HydraConfig.get().runtime.output_dir)
    ok = cfg.lr < 1
    score = 1 - cfg.lr + cfg.seed / 100 if ok else None
    record = {
        "status": "completed" if ok else "failed",
        "error": None if ok else "ValueError: lr too large",
        "overrides": list(HydraConfig.get().overrides.task),
        "optimized_metric": "val/balanced_accuracy",
        "mode": "max",
        "score": score,
        "best_val": {"val/balanced_accuracy": score} if ok else {},
    }
    (out / "run_status.json").write_text(json.dumps(record))
    if not ok:
        raise ValueError("lr too large")
    return score


if __name__ == "__main__":
    main()
"""

APP_CONFIG = """
lr: 0.1
seed: 0
hydra:
  sweep:
    dir: sweep
    subdir: ${hydra.job.num}
  callbacks:
    summarize:
      _target_: pneumonia.sweeps.callback.SummarizeSweep
"""


def run_sweep(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    (tmp_path / "app.py").write_text(textwrap.dedent(APP))
    (tmp_path / "app.yaml").write_text(APP_CONFIG)
    return subprocess.run(
        [sys.executable, "app.py", "-m", *overrides],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )


def test_a_hydra_sweep_ends_with_its_summary(tmp_path):
    result = run_sweep(tmp_path, "lr=0.1,0.01", "seed=1,2")
    assert result.returncode == 0, result.stderr
    sweep = tmp_path / "sweep"
    rows = read_csv(sweep / SUMMARY_CSV)
    assert [row["folder"] for row in rows] == ["3", "2", "1", "0"]
    assert [(row["lr"], row["seed"]) for row in rows] == [
        ("0.01", "2"),
        ("0.01", "1"),
        ("0.1", "2"),
        ("0.1", "1"),
    ]
    assert len(read_csv(sweep / SEED_CSV)) == 2
    assert f"sweep summary: {sweep / SUMMARY_MD}" in result.stdout + result.stderr


def test_a_sweep_with_a_failed_job_still_gets_its_summary(tmp_path):
    # Hydra re-raises the failed job's error before on_multirun_end: the summary written after
    # each job is what remains.
    result = run_sweep(tmp_path, "lr=0.1,5,0.01")
    assert result.returncode != 0
    rows = read_csv(tmp_path / "sweep" / SUMMARY_CSV)
    assert [(row["lr"], row["status"]) for row in rows] == [
        ("0.01", "completed"),
        ("0.1", "completed"),
        ("5", "failed"),
    ]
    assert rows[-1]["error"] == "ValueError: lr too large"
