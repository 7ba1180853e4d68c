"""Explanations of the X-ray classifiers, split by role as in Captum.

- :mod:`.methods`: the attribution methods (one module each) and how a classifier is attributed.
- :mod:`.trust`: trust metrics of the maps (randomisation sanity check, deletion, regions).
- :mod:`.rendering`: figures and raster grids (the study's Figure 3, summary sheets, epoch grids).
- :mod:`.settings`: :class:`~pneumonia.explain.settings.AttributionSettings`, the one vocabulary of
  attribution settings shared by the callback and ``explain.py``.
- :mod:`.inputs`: which images ``explain.py`` explains; :mod:`.run`: ``explain.py``'s task;
  :mod:`.callback`: the Lightning callback that draws maps during training.
"""
