"""The progress bar refreshes every step on the CPU and every N steps on an accelerator."""

from types import SimpleNamespace

import pytest
import torch

from pneumonia.training.progress import StepProgressBar


def _trainer(device: str):
    return SimpleNamespace(
        strategy=SimpleNamespace(root_device=torch.device(device)), is_global_zero=True
    )


@pytest.mark.parametrize(("device", "expected"), [("cpu", 1), ("cuda", 50), ("mps", 50)])
def test_automatic_refresh_rate_follows_the_device(device, expected):
    bar = StepProgressBar()
    bar.setup(_trainer(device), None, "fit")
    assert bar.refresh_rate == expected


def test_a_given_refresh_rate_is_kept_and_zero_disables_the_bar():
    bar = StepProgressBar(refresh_rate=7)
    bar.setup(_trainer("cuda"), None, "fit")
    assert bar.refresh_rate == 7
    assert not StepProgressBar(refresh_rate=0).is_enabled
