"""Every network of the ``model`` group trains, round-trips through a checkpoint and is explained."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from torch.utils.data import DataLoader, TensorDataset

from pneumonia.data.image_io import load_grayscale
from pneumonia.explain.methods import METHODS, ClassScores, attribution_fn, find_layer
from pneumonia.model.classifier import XrayClassifier
from tests.conftest import CONF_DIR

OPTIONS = sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))
SIZE = 64


@pytest.fixture(scope="module")
def real_batch(data_root) -> tuple[torch.Tensor, torch.Tensor]:
    """8 real X-rays (4 per class) at 64 px, uint8 ``(8, 1, 64, 64)``, and their labels."""
    images, labels = [], []
    for label, name in enumerate(("NORMAL", "PNEUMONIA")):
        for path in sorted((data_root / "train" / name).iterdir())[:4]:
            images.append(torch.from_numpy(load_grayscale(path, SIZE)))
            labels.append(float(label))
    return torch.stack(images).unsqueeze(1), torch.tensor(labels)


def _module(compose_config, option: str) -> XrayClassifier:
    cfg = compose_config(f"model={option}", f"image_size={SIZE}")
    return instantiate(cfg.model, optimizer=cfg.optimizer, _recursive_=False)


@pytest.mark.parametrize("option", OPTIONS)
def test_each_network_trains_and_round_trips_through_a_checkpoint(
    compose_config, real_batch, tmp_path, option
):
    torch.manual_seed(0)
    module = _module(compose_config, option)
    before = [p.detach().clone() for p in module.parameters()]
    loader = DataLoader(TensorDataset(*real_batch), batch_size=4, shuffle=True)
    trainer = L.Trainer(
        max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(module, train_dataloaders=loader)
    assert trainer.global_step == 2
    changed = [not torch.equal(a, b) for a, b in zip(before, module.parameters(), strict=True)]
    assert all(changed)  # every weight, the one-channel stem included, was trained
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    restored = XrayClassifier.load_from_checkpoint(path)
    torch.testing.assert_close(
        restored.predict_proba(real_batch[0]), module.predict_proba(real_batch[0])
    )


@pytest.mark.parametrize("option", OPTIONS)
def test_each_network_is_explained_by_every_method(compose_config, real_batch, option):
    torch.manual_seed(0)
    model = ClassScores(_module(compose_config, option))
    images = real_batch[0][:2].float() / 255
    targets = torch.tensor([0, 1])
    maps = {m: attribution_fn(m)(model, images, targets) for m in METHODS}
    for method, attribution in maps.items():
        assert attribution.shape == (2, 1, SIZE, SIZE), method
        assert torch.isfinite(attribution).all() and attribution.abs().amax() > 0, method
    # Guided backprop must really guide this network's activations, not return the gradient.
    assert not torch.allclose(maps["guided_backprop"], maps["saliency"])
    assert isinstance(find_layer(model, None), torch.nn.Module)
