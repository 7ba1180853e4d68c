"""Comparing runs: one table of every run below a folder (a sweep, or ``outputs/runs``).

    runs.py      find run folders and read what each recorded (status, overrides, metrics)
    summary.py   rank the runs, average over seeds, write ``summary.csv``, ``summary.md`` and
                 ``summary_by_seed.csv``
    figures.py   the ranking metric against each swept value, ``summary_<key>.png``
    callback.py  the Hydra callback that writes the summary at the end of every multirun

On demand: ``python -m pneumonia.compare <folder>`` (:mod:`pneumonia.compare`).
"""
