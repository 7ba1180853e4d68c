"""Models: the networks (``study_cnn``, ``bn_cnn``, ``resnet``, ``densenet``), the classes configs
and checkpoints may build (``registry``), batch augmentation (``augmentation``), input
normalisation (``normalization``), eval mode for a while (``modes``) and the LightningModule that
trains any binary net (``classifier``)."""

# Importing the built-in networks, batch augmentation and input normalisation registers them, so a
# config or a checkpoint can name them.
from pneumonia.model import (  # noqa: F401
    augmentation,
    bn_cnn,
    densenet,
    normalization,
    resnet,
    study_cnn,
)
