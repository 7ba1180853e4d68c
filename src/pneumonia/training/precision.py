"""Which numeric precision a CPU trains in: bf16 autocast where the chip computes bf16 natively.

On a CPU with AVX512-BF16 or AMX (Intel Sapphire Rapids and newer, AMD Zen 4 and newer), oneDNN
runs bf16 convolutions several times faster than fp32: the study CNN trains 1.5x faster on the
2-core machine this project is developed on. Elsewhere bf16 is emulated and slower than fp32, so
those CPUs keep full precision. Evaluation always runs in full precision (see
``XrayClassifier._evaluation_step``), so metrics, thresholds and calibration are never judged on
bf16-rounded logits.
"""

from __future__ import annotations

import torch

FULL = "32-true"
BF16_MIXED = "bf16-mixed"


def cpu_has_native_bf16() -> bool:
    """True when this CPU has AVX512-BF16 or AMX tiles (PyTorch's own checks)."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def cpu_precision() -> str:
    """Lightning's ``precision`` for CPU training here: ``bf16-mixed`` or ``32-true``.

    ``conf/trainer/cpu.yaml`` asks for it as ``${pneumonia.cpu_precision:}``; any run can pin one
    with ``trainer.precision=32-true``.
    """
    return BF16_MIXED if cpu_has_native_bf16() else FULL
