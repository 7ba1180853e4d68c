"""Explanations: attribution methods, figures, trust checks, the per-epoch callback."""
