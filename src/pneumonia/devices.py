"""Which torch device a command-line value names (``device=`` of predict.py and explain.py)."""

from __future__ import annotations

import torch

from pneumonia.errors import ConfigError

DEVICES = ("auto", "cpu", "cuda", "cuda:<index>")


def resolve_device(device: object) -> torch.device:
    """``auto`` -> CUDA when available, else the CPU; ``cpu``, ``cuda`` or ``cuda:<n>`` as named.

    Raises:
        ConfigError: an unknown device, or a CUDA device this machine does not have.
    """
    name = str(device).strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or (name.startswith("cuda:") and name[5:].isdigit()):
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device={device} but this machine has no CUDA GPU; use device=cpu or device=auto"
            )
        index = int(name[5:]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise ConfigError(
                f"device={device} but this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                f"numbered from 0"
            )
        return torch.device(name)
    raise ConfigError(f"device={device!r} must be one of {', '.join(DEVICES)}")
