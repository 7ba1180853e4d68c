"""CPU precision: bf16 autocast only where the CPU computes bf16 natively."""

import pytest
import torch

from pneumonia.training import precision


@pytest.mark.parametrize(
    ("avx512_bf16", "amx", "expected"),
    [(True, False, "bf16-mixed"), (False, True, "bf16-mixed"), (False, False, "32-true")],
)
def test_bf16_only_with_native_support(monkeypatch, avx512_bf16, amx, expected):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert precision.cpu_precision() == expected


def test_a_torch_without_the_checks_keeps_full_precision(monkeypatch):
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    assert precision.cpu_precision() == "32-true"


@pytest.mark.parametrize("native_bf16", [True, False])
def test_the_cpu_trainer_asks_for_it_and_a_run_can_pin_full_precision(
    compose_config, monkeypatch, native_bf16
):
    # On either kind of CPU: on this one's kind alone, the pin compared a value with itself.
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: native_bf16)
    expected = "bf16-mixed" if native_bf16 else "32-true"
    assert compose_config("trainer=cpu").trainer.precision == expected
    pinned = compose_config("trainer=cpu", "trainer.precision=32-true")
    assert pinned.trainer.precision == "32-true"
