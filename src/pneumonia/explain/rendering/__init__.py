"""Rendering: attribution maps turned into pictures; nothing here computes or judges a map.

- :mod:`.figures`: matplotlib figures with Captum's ``visualize_image_attr``: the study's Figure 3
  for one image (each sign alone and blended) and ``explain.py``'s summary grid; ``describe`` writes
  the label/prediction caption.
- :mod:`.raster`: the same grid drawn straight into pixels (milliseconds instead of seconds), for
  the per-epoch callback.

Images and maps are ``(H, W)`` (one per image) or ``(N, H, W)`` NumPy arrays.
"""
