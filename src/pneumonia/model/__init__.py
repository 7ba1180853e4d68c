"""Models: the study's CNN (``study_cnn``) and the LightningModule that trains any binary net (``classifier``)."""
