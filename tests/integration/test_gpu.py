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
    test_rows = (run_dir / "split.csv").read_text().count(",test\n")
    assert report["images"] == test_rows > 0 and report["weights"].startswith("the best checkpoint")
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


def test_a_diverged_gpu_run_stops_naming_the_step(small_root, cache_dir, tmp_path):
    run_dir = tmp_path / "diverged"
    result = train(
        f"data.root={small_root}", "image_size=64", "debug=limit", "trainer=gpu", "optimizer=sgd",
        "optimizer.lr=1e12", f"run_dir={run_dir}", cache_dir=cache_dir, check=False,
    )  # fmt: skip
    assert result.returncode != 0
    assert "training diverged at epoch 0, step" in result.stderr
    assert not (run_dir / "test_metrics.json").exists()


def test_predictions_on_the_gpu_take_cpu_inputs(small_root, cache_dir, tmp_path):
    from pneumonia.model.classifier import XrayClassifier

    run_dir = tmp_path / "gpu"
    train(
        f"data.root={small_root}", "image_size=64", "debug=limit", "trainer=gpu", f"run_dir={run_dir}",
        cache_dir=cache_dir,
    )  # fmt: skip
    last = run_dir / "checkpoints" / "last.ckpt"
    model = XrayClassifier.load_from_checkpoint(last, map_location="cuda")
    images = torch.randint(0, 256, (4, 1, 64, 64), dtype=torch.uint8)
    on_gpu = model.predict_proba(images)
    assert on_gpu.device.type == "cuda" and model.training
    on_cpu = XrayClassifier.load_from_checkpoint(last, map_location="cpu").predict_proba(images)
    # cuDNN convolutions run in TF32 by default (10-bit mantissa products, fp32 sums): close to
    # the CPU's fp32, not equal.
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, atol=2e-3, rtol=2e-3)
