"""Trust metrics: whether an attribution map can be believed, separate from computing or drawing it.

- :mod:`.sanity`: the model-parameter randomisation test (Adebayo et al. 2018): a map that survives
  randomised weights does not explain the model.
- :mod:`.faithfulness`: the deletion metric (Petsiuk et al. 2018): removing the pixels a faithful
  map ranks first makes the explained class's probability collapse early, faster than random order.
- :mod:`.regions`: where the attribution mass lies (central band, lungs, border) per class and sign,
  against each region's share of the image area.

Shapes: images ``(B, 1, H, W)`` in [0, 1], targets ``(B,)``, attributions ``(B, 1, H, W)``.
"""
