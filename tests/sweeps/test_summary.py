"""The sweep summary: which folders are runs, how they rank, what the tables hold, seeds, figures."""

from __future__ import annotations

import csv
import json
import os
import statistics
from pathlib import Path

import pytest

from pneumonia.sweeps import summary as summary_module
from pneumonia.sweeps.figures import swept_value_figure, uses_log_axis
from pneumonia.sweeps.runs import find_run_folders, parse_override, read_run
from pneumonia.sweeps.summary import (
    READ_METRICS,
    SEED_CSV,
    SUMMARY_CSV,
    SUMMARY_MD,
    UnknownMetricError,
    build_summary,
    summarize,
)

ERROR = "TrainingDivergedError: the training loss is nan at epoch 2, step 40\nsecond line"


def write_run(
    folder: Path,
    *,
    status: str | None = "completed",
    overrides: list[str] | None = None,
    score: float | None = None,
    metric: str = "val/balanced_accuracy",
    mode: str = "max",
    best_val: dict | None = None,
    error: str | None = None,
    epochs: int = 3,
    wall_time_s: float | None = 12.5,
    test: dict | None = None,
    external: dict | None = None,
    shift: float | None = None,
    shift_sets: tuple[tuple[str, int], ...] = (
        ("blur", 1),
        ("blur", 2),
        ("noise", 1),
        ("noise", 2),
    ),
) -> Path:
    """A run folder as the training code leaves it (``status=None``: an older run, no record)."""
    folder.mkdir(parents=True)
    if best_val is None and score is not None:
        best_val = {metric: score, "val/auroc": score - 0.01, "val/loss": 1 - score}
    if status is not None:
        record = {
            "status": status,
            "error": error,
            "overrides": overrides or [],
            "optimized_metric": metric,
            "mode": mode,
            "score": score if status == "completed" else None,
            "started": "2026-01-01T10:00:00",
            "finished": None if status == "running" else "2026-01-01T10:00:12",
            "wall_time_s": wall_time_s,
            "epochs": epochs,
            "global_step": 40,
            "best_epoch": 1,
            "best_val": best_val or {},
            "last_val": best_val or {},
        }
        (folder / "run_status.json").write_text(json.dumps(record))
    if test is not None or external is not None or shift is not None:
        report: dict = {"metrics": test or {}, "confusion_matrix": [[1, 0], [0, 1]]}
        if external is not None:
            report["external"] = {
                name: {"metrics": metrics, "ece": 0.05, "images": 40, "folder": "/x"}
                for name, metrics in external.items()
            }
        if shift is not None:
            rows = [{"perturbation": name, "severity": level} for name, level in shift_sets]
            report["shift_suite"] = {"threshold": 0.5, "score": shift, "clean": {}, "rows": rows}
        (folder / "test_metrics.json").write_text(json.dumps(report))
    return folder


def write_hydra_record(folder: Path, overrides: list[str], metric: str = "val/balanced_accuracy"):
    hydra = folder / ".hydra"
    hydra.mkdir(parents=True, exist_ok=True)
    (hydra / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (hydra / "config.yaml").write_text(f"seed: 42\noptimized_metric: {metric}\n")


def write_metrics_csv(folder: Path, epochs: list[dict]) -> None:
    """Lightning's CSV log: a train row and a validation row per epoch, and a test row at the end."""
    columns = [
        "epoch",
        "step",
        "train/loss_epoch",
        "val/balanced_accuracy",
        "val/loss",
        "test/auroc",
    ]
    (folder / "csv").mkdir(parents=True, exist_ok=True)
    with (folder / "csv" / "metrics.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for epoch, values in enumerate(epochs):
            writer.writerow({"epoch": epoch, "step": 10 * epoch + 9, "train/loss_epoch": 0.5})
            writer.writerow({"epoch": epoch, "step": 10 * epoch + 9, **values})
        writer.writerow({"epoch": len(epochs), "step": 99, "test/auroc": 0.5})


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


TEST = {"balanced_accuracy": 0.9, "auroc": 0.97, "recall": 0.98, "ece": 0.03, "threshold": 0.4}


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    """A sweep over optimizer and learning rate, three seeds of one setting, every kind of end."""
    root = tmp_path / "multirun"
    write_run(
        root / "adam_0.001",
        overrides=["optimizer=adam", "optimizer.lr=0.001", "+data.external_tests.site_b=/b"],
        score=0.95,
        test=TEST,
        external={"site_b": {"balanced_accuracy": 0.7, "auroc": 0.8}},
        shift=0.81,
    )
    write_run(root / "sgd_0.03", overrides=["optimizer=sgd", "optimizer.lr=0.03"], score=0.90)
    write_run(
        root / "sgd_0.1",
        status="failed",
        overrides=["optimizer=sgd", "optimizer.lr=0.1"],
        best_val={"val/balanced_accuracy": 0.5},
        error=ERROR,
    )
    # Higher than any finished run, but unfinished: it must not rank first.
    write_run(
        root / "adam_0.1",
        status="running",
        overrides=["optimizer=adam", "optimizer.lr=0.1"],
        best_val={"val/balanced_accuracy": 0.99},
        wall_time_s=None,
    )
    for seed, score in ((1, 0.91), (2, 0.93), (3, 0.98)):
        write_run(
            root / f"adam_0.01_seed{seed}",
            overrides=["optimizer=adam", "optimizer.lr=0.01", f"seed={seed}"],
            score=score,
            test={"balanced_accuracy": score - 0.05},
        )
    for seed, score in ((1, 0.80), (2, 0.84)):
        write_run(
            root / f"sgd_0.01_seed{seed}",
            overrides=["optimizer=sgd", "optimizer.lr=0.01", f"seed={seed}"],
            score=score,
        )
    write_run(
        root / "sgd_0.01_seed3",
        status="failed",
        overrides=["optimizer=sgd", "optimizer.lr=0.01", "seed=3"],
        error="ValueError: boom",
    )
    # A run from before run_status.json: overrides from Hydra, validation from the CSV log.
    old = root / "old"
    write_hydra_record(old, ["optimizer=sgd", "optimizer.lr=0.001"])
    write_metrics_csv(
        old,
        [
            {"val/balanced_accuracy": 0.70, "val/loss": 0.6},
            {"val/balanced_accuracy": 0.92, "val/loss": 0.3},
            {"val/balanced_accuracy": 0.85, "val/loss": 0.2},
        ],
    )
    return root


def test_runs_rank_by_score_with_unfinished_and_failed_last(sweep):
    summary = summarize(sweep)
    rows = read_csv(sweep / SUMMARY_CSV)
    assert [row["folder"] for row in rows] == [
        "adam_0.01_seed3",
        "adam_0.001",
        "adam_0.01_seed2",
        "adam_0.01_seed1",
        "sgd_0.03",
        "sgd_0.01_seed2",
        "sgd_0.01_seed1",
        "old",
        "adam_0.1",
        "sgd_0.1",  # the best validation it reached before failing ranks it among the failed
        "sgd_0.01_seed3",
    ]
    assert [row["status"] for row in rows[-4:]] == [
        "unknown",
        "running or interrupted",
        "failed",
        "failed",
    ]
    assert [row["rank"] for row in rows] == [str(i) for i in range(1, 12)]
    assert float(rows[0]["score"]) == 0.98
    assert summary.metric == "val/balanced_accuracy" and summary.mode == "max"


def test_a_failed_run_shows_the_first_line_of_its_error(sweep):
    summarize(sweep)
    failed = next(row for row in read_csv(sweep / SUMMARY_CSV) if row["folder"] == "sgd_0.1")
    assert failed["error"] == "TrainingDivergedError: the training loss is nan at epoch 2, step 40"
    markdown = (sweep / SUMMARY_MD).read_text()
    line = next(line for line in markdown.splitlines() if "| sgd_0.1 |" in line)
    assert "failed: TrainingDivergedError: the training loss is nan at epoch 2, step 40" in line
    assert "second line" not in markdown
    assert "| running or interrupted |" in markdown


def test_mode_min_ranks_the_smallest_first(tmp_path):
    for name, loss in (("a", 0.3), ("b", 0.1), ("c", 0.2)):
        write_run(
            tmp_path / name, overrides=[f"x={name}"], score=loss, metric="val/loss", mode="min"
        )
    summary = summarize(tmp_path)
    assert [run.folder for run in summary.runs] == ["b", "c", "a"]
    assert summary.mode == "min"
    # --mode overrides what the runs recorded.
    assert [run.folder for run in summarize(tmp_path, mode="max").runs] == ["a", "c", "b"]


def test_another_metric_reranks_and_an_unknown_one_lists_the_available(sweep):
    summary = summarize(sweep, metric="test/balanced_accuracy")
    assert summary.runs[0].folder == "adam_0.01_seed3"
    ranked = [(run.folder, summary.score(run)) for run in summary.runs[:4]]
    assert ranked == [
        ("adam_0.01_seed3", pytest.approx(0.93)),
        ("adam_0.001", 0.9),
        ("adam_0.01_seed2", pytest.approx(0.88)),
        ("adam_0.01_seed1", pytest.approx(0.86)),
    ]
    # val/<m> means the best epoch's val_best/<m>.
    assert summarize(sweep, metric="val/auroc").runs[0].folder == "adam_0.01_seed3"
    with pytest.raises(UnknownMetricError) as raised:
        summarize(sweep, metric="val/nonsense")
    assert "val_best/balanced_accuracy" in raised.value.available
    assert "val_best/balanced_accuracy" in str(raised.value)


def test_columns_are_the_overrides_and_the_metrics_people_read(sweep):
    summarize(sweep)
    header = list(read_csv(sweep / SUMMARY_CSV)[0])
    assert header[:3] == ["rank", "status", "error"]
    assert header[-3:] == ["epochs", "wall_time_s", "folder"]
    for column in (
        "optimizer",
        "optimizer.lr",
        "seed",
        "data.external_tests.site_b",
        "score",
        "val_best/balanced_accuracy",
        "val_best/auroc",
        "val_best/loss",
        "test/balanced_accuracy",
        "test/auroc",
        "test/recall",
        "external/site_b/balanced_accuracy",
        "external/site_b/auroc",
        "shift/robustness",
    ):
        assert column in header, column
    # Not every logged scalar: calibration, thresholds, the last epoch, a + of the override.
    for column in (
        "+data.external_tests.site_b",
        "test/ece",
        "test/threshold",
        "external/site_b/ece",
        "val_last/balanced_accuracy",
        "train/loss_epoch",
        "test/precision",  # no run has it
    ):
        assert column not in header, column
    best = next(row for row in read_csv(sweep / SUMMARY_CSV) if row["folder"] == "adam_0.001")
    assert float(best["external/site_b/balanced_accuracy"]) == 0.7
    assert float(best["shift/robustness"]) == 0.81
    assert float(best["test/auroc"]) == 0.97
    assert best["data.external_tests.site_b"] == "/b"
    assert float(best["wall_time_s"]) == 12.5 and best["epochs"] == "3"


def test_without_external_sets_or_shift_suite_there_are_no_such_columns(tmp_path):
    write_run(tmp_path / "a", overrides=["optimizer=adam"], score=0.9, test=TEST)
    write_run(tmp_path / "b", overrides=["optimizer=sgd"], score=0.8)
    summarize(tmp_path)
    header = list(read_csv(tmp_path / SUMMARY_CSV)[0])
    assert "test/balanced_accuracy" in header
    assert not [c for c in header if c.startswith(("external/", "shift/"))]


def test_an_older_run_takes_its_best_epoch_from_the_csv_log_and_overrides_from_hydra(sweep):
    run = read_run(sweep / "old", sweep)
    assert run.status == "unknown"
    assert run.overrides == {"optimizer": "sgd", "optimizer.lr": "0.001"}
    assert run.optimized_metric == "val/balanced_accuracy"
    assert run.values["val_best/balanced_accuracy"] == 0.92
    assert run.values["val_best/loss"] == 0.3  # the best epoch's, not the lowest
    assert run.values["val_last/balanced_accuracy"] == 0.85
    assert run.epochs == 3
    assert "test/auroc" not in run.values  # test metrics come from test_metrics.json only


def test_the_csv_log_is_ranked_by_a_validation_optimized_metric(tmp_path):
    folder = tmp_path / "old"
    write_hydra_record(folder, ["x=1"], metric="val/loss")
    write_metrics_csv(
        folder,
        [
            {"val/balanced_accuracy": 0.9, "val/loss": 0.5},
            {"val/balanced_accuracy": 0.8, "val/loss": 0.2},
        ],
    )
    run = read_run(folder, tmp_path)
    assert run.values["val_best/loss"] == 0.2 and run.values["val_best/balanced_accuracy"] == 0.8


def test_overrides_come_from_the_original_hydra_record_not_a_rerun(tmp_path):
    folder = tmp_path / "run"
    write_run(folder, score=0.9)
    record = json.loads((folder / "run_status.json").read_text())
    del record["overrides"]
    (folder / "run_status.json").write_text(json.dumps(record))
    write_hydra_record(folder, ["optimizer=sgd", "run_dir=/somewhere", "~callbacks.x"])
    # Where a rerun writes its record (hydra_hooks.record_dir): .hydra/rerun-<time>/, no .hydra
    rerun = folder / ".hydra" / "rerun-2026-01-01_10-00-00-000000"
    rerun.mkdir()
    (rerun / "overrides.yaml").write_text("- optimizer=adam\n")
    (rerun / "config.yaml").write_text("seed: 1\noptimized_metric: val/auroc\n")
    assert read_run(folder, tmp_path).overrides == {"optimizer": "sgd", "callbacks.x": "(deleted)"}


def test_robustness_scores_of_different_shift_suites_are_said_not_to_compare(tmp_path):
    # A suite of two perturbations scores far higher than the full one: ranked side by side
    # without a word, the easier suite looked like the more robust model.
    write_run(tmp_path / "full", score=0.9, shift=0.80)
    write_run(tmp_path / "full_too", score=0.8, shift=0.78)
    write_run(tmp_path / "easy", score=0.85, shift=0.95, shift_sets=(("blur", 1), ("blur", 2)))
    write_run(tmp_path / "gappy", score=0.7, shift=0.9, shift_sets=(("blur", 1), ("noise", 2)))
    summary = summarize(tmp_path)
    assert [run.shift_suite for run in summary.runs] == [
        "blur, noise at severities 1, 2",
        "blur at severities 1, 2",
        "blur, noise at severities 1, 2",
        "blur, noise at severities 1, 2 (2 of 4 sets)",
    ]
    [note] = [note for note in summary.notes if "shift suites" in note]
    assert "`full`, `full_too`" in note and "`easy`" in note and "(2 of 4 sets) (`gappy`)" in note
    assert note in (tmp_path / SUMMARY_MD).read_text()
    # One suite in every run: nothing to say.
    for folder in ("easy", "gappy"):
        (tmp_path / folder / "test_metrics.json").unlink()
    assert not [note for note in summarize(tmp_path).notes if "shift suites" in note]


def test_parse_override_strips_the_prefixes_and_keeps_the_value_as_written():
    assert parse_override("+optimizer.lr=1e-3") == ("optimizer.lr", "1e-3")
    assert parse_override("++a.b=x=y") == ("a.b", "x=y")
    assert parse_override("model=resnet18") == ("model", "resnet18")


def test_an_unreadable_status_record_is_a_row_not_a_crash(tmp_path):
    write_run(tmp_path / "good", overrides=["x=1"], score=0.9)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "run_status.json").write_text('{"status": "compl')
    summary = summarize(tmp_path)
    bad = summary.runs[-1]
    assert bad.folder == "bad" and bad.status == "unknown"
    assert bad.error.startswith("run_status.json unreadable: JSONDecodeError")


def test_seeds_of_one_setting_are_averaged(sweep):
    summary = summarize(sweep)
    groups = {
        (g.overrides["optimizer"], g.overrides["optimizer.lr"]): g for g in summary.seed_groups
    }
    # Settings run once are not groups; neither are two runs of the same seed.
    assert set(groups) == {("adam", "0.01"), ("sgd", "0.01")}
    adam = groups["adam", "0.01"]
    assert adam.seeds == ["1", "2", "3"]
    mean, std, count = adam.stats["score"]
    assert mean == pytest.approx(statistics.fmean([0.91, 0.93, 0.98]))
    assert std == pytest.approx(statistics.stdev([0.91, 0.93, 0.98]))
    assert count == 3
    assert adam.stats["test/balanced_accuracy"][0] == pytest.approx(0.89)
    # A failed seed counts as a run but not in the means.
    sgd = groups["sgd", "0.01"]
    assert (len(sgd.runs), sgd.finished, sgd.stats["score"][2]) == (3, 2, 2)
    assert sgd.stats["score"][0] == pytest.approx(0.82)
    assert [g.overrides["optimizer"] for g in summary.seed_groups] == ["adam", "sgd"]

    rows = read_csv(sweep / SEED_CSV)
    assert [row["optimizer"] for row in rows] == ["adam", "sgd"]
    assert "seed" not in rows[0]
    assert rows[0]["seeds"] == "1 2 3" and rows[0]["runs"] == "3"
    assert float(rows[0]["score mean"]) == pytest.approx(mean)
    assert float(rows[0]["score std"]) == pytest.approx(std)
    assert rows[0]["score n"] == "3"
    assert rows[1]["runs"] == "3" and rows[1]["finished"] == "2"

    markdown = (sweep / SUMMARY_MD).read_text()
    assert "## Mean over seeds" in markdown
    assert f"{mean:.4f} ± {std:.4f}" in markdown


def test_repeats_of_one_seed_are_not_a_seed_group(tmp_path):
    write_run(tmp_path / "a", overrides=["x=1", "seed=1"], score=0.9)
    write_run(tmp_path / "b", overrides=["x=1", "seed=1", "run_dir=/b"], score=0.8)
    write_run(tmp_path / "c", overrides=["x=2"], score=0.7)
    summary = summarize(tmp_path)
    assert summary.seed_groups == []
    assert not (tmp_path / SEED_CSV).exists()
    assert "Mean over seeds" not in (tmp_path / SUMMARY_MD).read_text()


def test_markdown_is_a_readable_table_with_four_decimals(sweep):
    markdown = summarize(sweep).to_markdown()
    assert markdown == (sweep / SUMMARY_MD).read_text()
    lines = markdown.splitlines()
    header = next(line for line in lines if line.startswith("| # |"))
    assert "| optimizer | optimizer.lr | seed |" in header
    first = lines[lines.index(header) + 2]
    # The empty cell: this run kept the config's data.external_tests (the adam_0.001 run set one).
    assert first.startswith("| 1 | completed | adam | 0.01 | 3 |  | 0.9800 |")
    assert first.endswith("| 3 | 12s | adam_0.01_seed3 |")
    table = lines[lines.index(header) : lines.index(header) + 13]
    assert all(line.startswith("|") for line in table) and len(table) == 13
    assert len({line.count("|") for line in table}) == 1
    assert "ranked by **val/balanced_accuracy** (max)" in markdown


def test_overrides_every_run_shares_are_named_once_not_a_column(tmp_path):
    for lr in ("0.1", "0.01"):
        write_run(
            tmp_path / lr, overrides=["trainer.max_epochs=2", f"optimizer.lr={lr}"], score=0.9
        )
    summary = summarize(tmp_path)
    assert summary.swept_keys == ["optimizer.lr"]
    markdown = (tmp_path / SUMMARY_MD).read_text()
    assert "Same in every run: `trainer.max_epochs=2`." in markdown
    assert "| trainer.max_epochs |" not in markdown
    assert "trainer.max_epochs" in read_csv(tmp_path / SUMMARY_CSV)[0]


def test_a_figure_per_swept_key_with_a_line_per_optimizer(sweep):
    summary = summarize(sweep)
    names = sorted(path.name for path in sweep.glob("summary_*.png"))
    # data.external_tests.site_b differs too, but one value is no sweep: no figure.
    assert names == ["summary_optimizer.lr.png", "summary_optimizer.png"]
    for path in sweep.glob("summary_*.png"):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (
        "![val/balanced_accuracy against optimizer.lr](summary_optimizer.lr.png)"
        in (sweep / SUMMARY_MD).read_text()
    )

    figure = swept_value_figure(summary, "optimizer.lr")
    ax = figure.axes[0]
    assert ax.get_xscale() == "log"  # 0.001 .. 0.03 spans more than 10x
    assert ax.get_ylabel() == "val/balanced_accuracy"
    # One line per combination of the other swept keys: optimizer, and the external set one run had.
    lines = {
        label: dict(zip(*container.lines[0].get_data(), strict=True))
        for container in ax.containers
        if (label := container.get_label())
    }
    assert lines == {
        "optimizer=adam, data.external_tests.site_b=/b": {0.001: 0.95},
        "optimizer=adam, data.external_tests.site_b=default": {
            0.01: pytest.approx(statistics.fmean([0.91, 0.93, 0.98])),
        },
        "optimizer=sgd, data.external_tests.site_b=default": {
            0.001: 0.92,  # the older run without a status record
            0.01: pytest.approx(0.82),  # the mean of two seeds; the failed third is not drawn
            0.03: 0.90,
        },
    }
    adam = next(
        c
        for c in ax.containers
        if c.get_label() == "optimizer=adam, data.external_tests.site_b=default"
    )
    # Seeds give an error bar of their standard deviation.
    assert adam.has_yerr


def test_figures_of_a_narrow_numeric_range_are_linear_and_nothing_swept_draws_nothing(tmp_path):
    assert (
        uses_log_axis([0.001, 0.1]) and not uses_log_axis([1, 2, 4]) and not uses_log_axis([0, 100])
    )
    write_run(tmp_path / "one", overrides=["optimizer=adam"], score=0.9)
    summary = summarize(tmp_path)
    assert summary.figures == [] and not list(tmp_path.glob("*.png"))
    assert "## Figures" not in (tmp_path / SUMMARY_MD).read_text()


def test_files_are_replaced_whole_and_stale_figures_removed(sweep, monkeypatch):
    summarize(sweep)
    (sweep / "summary_gone.png").write_bytes(b"old")
    written_whole = []
    real_write_atomic = summary_module.write_atomic
    monkeypatch.setattr(
        summary_module,
        "write_atomic",
        lambda path, text: written_whole.append(Path(path).name) or real_write_atomic(path, text),
    )
    summarize(sweep, output=sweep)
    assert not (sweep / "summary_gone.png").exists()
    assert sorted(written_whole) == sorted([SUMMARY_CSV, SEED_CSV, SUMMARY_MD])
    assert not [p for p in sweep.iterdir() if p.name.endswith(".partial")]


def test_run_folders_are_found_at_any_depth_but_not_inside_a_run(tmp_path):
    write_run(tmp_path / "sweep" / "10", score=0.9)
    write_run(tmp_path / "sweep" / "2", score=0.8)
    write_hydra_record(tmp_path / "runs" / "2026-01-01_10-00-00", ["x=1"])
    # A run's own subfolders are not runs, whatever they hold.
    nested = tmp_path / "sweep" / "2" / "checkpoints"
    nested.mkdir()
    (nested / "run_status.json").write_text("{}")
    (tmp_path / ".hidden" / "run").mkdir(parents=True)
    (tmp_path / ".hidden" / "run" / "run_status.json").write_text("{}")
    (tmp_path / "loop").mkdir()
    (tmp_path / "loop" / "back").symlink_to(tmp_path)
    found = [path.relative_to(tmp_path).as_posix() for path in find_run_folders(tmp_path)]
    assert found == ["runs/2026-01-01_10-00-00", "sweep/2", "sweep/10"]
    # A run folder given itself is one run, named ".".
    single = tmp_path / "sweep" / "2"
    assert build_summary([read_run(single, single)], single).runs[0].folder == "."


def test_the_read_metrics_cover_the_diagnostic_metrics():
    from pneumonia.metrics.diagnostic import METRIC_NAMES

    assert set(METRIC_NAMES) <= set(READ_METRICS)


def test_a_running_status_is_told_live_or_killed_by_the_run_lock(tmp_path):
    from pneumonia.training.status import hold_run_folder

    for name in ("live", "killed"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "run_status.json").write_text(
            json.dumps({"status": "running", "optimized_metric": "val/balanced_accuracy"})
        )
        with hold_run_folder(tmp_path / name):  # leaves the lock file behind, free
            pass
    with hold_run_folder(tmp_path / "live"):
        summarize(tmp_path, plots=False)
    statuses = {row["folder"]: row["status"] for row in read_csv(tmp_path / SUMMARY_CSV)}
    assert statuses == {"live": "running", "killed": "interrupted"}


def test_crafted_records_are_named_unreadable_and_never_stop_the_table(tmp_path):
    write_run(tmp_path / "good", overrides=["optimizer.lr=0.1"], score=0.9)
    huge = write_run(tmp_path / "huge_number", overrides=["optimizer.lr=0.2"], score=0.8)
    record = (
        (huge / "run_status.json").read_text().replace('"score": 0.8', '"score": 1' + "0" * 400)
    )
    (huge / "run_status.json").write_text(record)  # an integer too large for a float
    deep = tmp_path / "deep" / "run_status.json"
    deep.parent.mkdir()
    deep.write_text("[" * 100_000 + "]" * 100_000)
    fifo = write_run(tmp_path / "fifo", overrides=["optimizer.lr=0.3"], score=0.7)
    (fifo / ".hydra").mkdir(exist_ok=True)
    (fifo / ".hydra" / "overrides.yaml").unlink(missing_ok=True)
    os.mkfifo(fifo / ".hydra" / "overrides.yaml")  # reading it would block for ever
    summary = summarize(tmp_path, plots=False)
    rows = {row["folder"]: row for row in read_csv(tmp_path / SUMMARY_CSV)}
    assert rows["good"]["rank"] == "1" and rows["huge_number"]["status"] == "completed"
    assert "RecursionError" in rows["deep"]["error"]
    assert len(summary.runs) == 4


def test_a_job_stopped_before_it_began_ranks_after_an_interrupted_one_with_a_score(tmp_path):
    # Ctrl-C while a joblib sweep started its jobs left one with only its Hydra record; it
    # ranked first.
    write_run(tmp_path / "seed=1", status="interrupted", overrides=["seed=1"], score=0.5)
    begun = tmp_path / "seed=2" / ".hydra"
    begun.mkdir(parents=True)
    (begun / "config.yaml").write_text("seed: 2\n")
    (begun / "overrides.yaml").write_text("- seed=2\n")
    summary = summarize(tmp_path, plots=False)
    assert [run.folder for run in summary.runs] == ["seed=1", "seed=2"]
