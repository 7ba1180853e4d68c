"""A run folder keeps its original Hydra record; a failed job's traceback lands in its task log."""

from __future__ import annotations

import logging

from hydra.core.utils import JobReturn, JobStatus

from pneumonia.hydra_hooks import LogFailedJob, record_dir


def test_a_new_folder_records_in_dot_hydra_and_a_used_one_beside_it(tmp_path):
    assert record_dir(str(tmp_path)) == ".hydra"
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text("original: true\n")
    again = record_dir(str(tmp_path))
    assert again.startswith(".hydra/rerun-") and again != record_dir(str(tmp_path))


def test_a_failed_job_writes_its_traceback_to_the_file_log_only(tmp_path, capsys):
    file_handler = logging.FileHandler(tmp_path / "train.log")
    stream_handler = logging.StreamHandler()
    root = logging.getLogger()
    root.addHandler(file_handler)
    root.addHandler(stream_handler)
    try:

        def failing_step():
            raise ValueError("the learning rate was negative")

        job = JobReturn()
        try:
            failing_step()
        except ValueError as err:
            job.return_value = err
        job.status = JobStatus.FAILED
        LogFailedJob().on_job_end(config=None, job_return=job)
        succeeded = JobReturn()
        succeeded.return_value, succeeded.status = 0.9, JobStatus.COMPLETED
        LogFailedJob().on_job_end(config=None, job_return=succeeded)
    finally:
        root.removeHandler(file_handler)
        root.removeHandler(stream_handler)
        file_handler.close()
    text = (tmp_path / "train.log").read_text()
    assert "run failed:\nTraceback (most recent call last):" in text
    assert "in failing_step" in text and "ValueError: the learning rate was negative" in text
    assert "on_job_end" not in text  # starts where the job failed, not in the hook
    assert text.count("run failed") == 1
    assert "run failed" not in capsys.readouterr().err  # Hydra prints it on the terminal itself
