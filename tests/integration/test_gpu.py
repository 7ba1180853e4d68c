"""The CUDA path: bf16 mixed-precision training on a GPU, and its checkpoint used on the CPU.

Skipped on machines without CUDA (CI has none); run on a GPU machine with
``pytest tests/integration/test_gpu.py``.
"""

import json

import pytest
import torch

from tests.integration.conftest import train

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_bf16_training_on_gpu_and_evaluation_on_cpu(small_root, cache_dir, tmp_path):
    run_dir = tmp_path / "gpu"
    train(
        f"data.root={small_root}", "image_size=64", "debug=limit", "trainer=gpu", "data.pin_memory=true",
        f"run_dir={run_dir}", cache_dir=cache_dir,
    )  # fmt: skip
    report = json.loads((run_dir / "test_metrics.json").read_text())
    assert 0.0 <= report["metrics"]["balanced_accuracy"] <= 1.0
    checkpoint = torch.load(
        run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True
    )
    assert all(
        t.device.type == "cpu" and t.dtype == torch.float32
        for t in checkpoint["state_dict"].values()
        if t.is_floating_point()
    )
    out = tmp_path / "cpu_eval"
    train(
        f"ckpt_path={run_dir}",
        f"data.root={small_root}",
        "trainer=cpu",
        f"run_dir={out}",
        config_name="eval",
        cache_dir=cache_dir,
    )
    assert json.loads((out / "test_metrics.json").read_text())["images"] == 120
