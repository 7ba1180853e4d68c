"""Metrics: every diagnostic figure derived from one confusion matrix, and the figures that show it."""
