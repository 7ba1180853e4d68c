"""Models: the networks (``study_cnn``, ``bn_cnn``, ``resnet``, ``densenet``), the classes configs
and checkpoints may build (``registry``) and the LightningModule that trains any binary net
(``classifier``)."""

# Importing the built-in networks registers them, so a config or a checkpoint can name them.
from pneumonia.model import bn_cnn, densenet, resnet, study_cnn  # noqa: F401
