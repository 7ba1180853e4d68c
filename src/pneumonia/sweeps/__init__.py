"""Comparing runs: one table of every run below a folder (a sweep, or ``outputs/runs``).

    summary.py   find run folders, read what each recorded, rank them, average over seeds, write
                 ``summary.csv``, ``summary.md`` and ``summary_by_seed.csv``
    figures.py   the ranking metric against each swept value, ``summary_<key>.png``
    callback.py  the Hydra callback that writes the summary at the end of every multirun

On demand: ``python -m pneumonia.compare <folder>`` (:mod:`pneumonia.compare`).
"""
