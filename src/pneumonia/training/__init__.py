"""Training entry: composes data, model, trainer and loggers from a Hydra config and runs them."""
