"""Models: the study's CNN (``study_cnn``), the classes configs and checkpoints may build
(``registry``) and the LightningModule that trains any binary net (``classifier``)."""

# Importing the built-in networks registers them, so a checkpoint can name them.
from pneumonia.model import study_cnn  # noqa: F401
