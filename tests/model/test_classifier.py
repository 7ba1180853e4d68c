import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from pneumonia.model.classifier import XrayClassifier

NET = {
    "_target_": "pneumonia.model.study_cnn.StudyCNN",
    "image_size": 32,
    "channels": [4, 8, 8],
    "hidden_features": 8,
}
ADAM = {"_target_": "torch.optim.Adam", "lr": 1e-3}


def _random_loader(n=16, size=32):
    images = torch.randint(0, 256, (n, 1, size, size), dtype=torch.uint8)
    labels = (torch.arange(n) % 2).float()
    return DataLoader(TensorDataset(images, labels), batch_size=8)


def _is_plain(value) -> bool:
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_plain(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return all(_is_plain(v) for v in value)
    return value is None or isinstance(value, bool | int | float | str)


def test_checkpoint_round_trip_with_weights_only(tmp_path):
    module = XrayClassifier(
        net=NET,
        optimizer=ADAM,
        image_size=32,
        class_weights=[2.0, 0.5],
        pixel_mean=0.4,
        pixel_std=0.2,
    )
    trainer = L.Trainer(
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, train_dataloaders=_random_loader(), val_dataloaders=_random_loader())
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)

    raw = torch.load(path, map_location="cpu", weights_only=True)  # raises on pickled objects
    assert _is_plain(dict(raw["hyper_parameters"]))
    restored = XrayClassifier.load_from_checkpoint(path, map_location="cpu", weights_only=True)
    assert restored.hparams.class_weights == [2.0, 0.5] and restored.hparams.pixel_std == 0.2
    images = next(iter(_random_loader()))[0]
    module.eval()
    restored.eval()
    torch.testing.assert_close(restored(images), module(images))


def test_hydra_configs_are_stored_as_plain_containers():
    from omegaconf import OmegaConf

    module = XrayClassifier(
        net=OmegaConf.create(NET), optimizer=OmegaConf.create(ADAM), image_size=32
    )
    assert type(module.hparams.net) is dict and type(module.hparams.optimizer) is dict


def test_training_loss_is_class_weighted_and_evaluation_loss_is_not():
    module = XrayClassifier(net=NET, optimizer=ADAM, image_size=32, class_weights=[3.0, 0.5])
    logits = torch.tensor([0.3, -1.2, 2.0, 0.1])
    targets = torch.tensor([0.0, 1.0, 1.0, 0.0])
    per_sample = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    expected = (per_sample * torch.tensor([3.0, 0.5, 0.5, 3.0])).mean()
    torch.testing.assert_close(module._loss(logits, targets, weighted=True), expected)
    torch.testing.assert_close(module._loss(logits, targets, weighted=False), per_sample.mean())


def test_preprocessing_uses_the_stored_statistics():
    module = XrayClassifier(net=NET, optimizer=ADAM, image_size=32, pixel_mean=0.5, pixel_std=0.25)
    images = torch.tensor([0, 255], dtype=torch.uint8).repeat(16, 16)[None, None]
    assert module.preprocess(images).unique().tolist() == [pytest.approx(-2.0), pytest.approx(2.0)]


@pytest.mark.parametrize(
    ("optimizer", "kind", "settings"),
    [
        (ADAM, torch.optim.Adam, {"lr": 1e-3}),
        (
            {"_target_": "torch.optim.SGD", "lr": 0.01, "momentum": 0.9},
            torch.optim.SGD,
            {"lr": 0.01, "momentum": 0.9},
        ),
    ],
)
def test_optimizer_comes_from_its_config(optimizer, kind, settings):
    module = XrayClassifier(net=NET, optimizer=optimizer, image_size=32)
    built = module.configure_optimizers()
    assert type(built) is kind
    assert {k: built.param_groups[0][k] for k in settings} == settings
    assert built.param_groups[0]["params"] == list(module.parameters())


def test_scheduler_config_is_wired():
    scheduler = {
        "_target_": "torch.optim.lr_scheduler.CosineAnnealingLR",
        "T_max": 5,
        "interval": "step",
    }
    module = XrayClassifier(net=NET, optimizer=ADAM, scheduler=scheduler, image_size=32)
    config = module.configure_optimizers()
    built = config["lr_scheduler"]["scheduler"]
    assert type(built) is torch.optim.lr_scheduler.CosineAnnealingLR and built.T_max == 5
    assert built.optimizer is config["optimizer"] and config["lr_scheduler"]["interval"] == "step"


def _trained_checkpoint(tmp_path):
    module = XrayClassifier(net=NET, optimizer=ADAM, image_size=32)
    trainer = L.Trainer(
        max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(module, train_dataloaders=_random_loader())
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    return path


def test_predictions_of_a_loaded_model_repeat_and_leave_its_mode_alone(tmp_path):
    model = XrayClassifier.load_from_checkpoint(_trained_checkpoint(tmp_path), map_location="cpu")
    assert model.training  # as Lightning returns it: dropout would be on in a plain forward
    images = next(iter(_random_loader(n=8)))[0]
    first, second = model.predict_proba(images), model.predict_proba(images)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    assert model.training and model.net.classifier[3].training  # the caller's mode is restored
    model.net.features.eval()  # a caller's mixed modes come back exactly as they were
    modes = [m.training for m in model.modules()]
    model.predict_proba(images)
    assert [m.training for m in model.modules()] == modes
    model.eval()
    torch.testing.assert_close(model.predict_proba(images), first)
    assert not model.training
    torch.testing.assert_close(first, torch.sigmoid(model(images)))


def test_predictions_accept_one_image_or_a_batch_as_uint8_or_float():
    model = XrayClassifier(net=NET, optimizer=ADAM, image_size=32)
    batch = torch.randint(0, 256, (3, 1, 32, 32), dtype=torch.uint8)
    expected = model.predict_proba(batch)
    assert expected.shape == (3,)
    torch.testing.assert_close(model.predict_proba(batch.float() / 255), expected)
    torch.testing.assert_close(model.predict_proba(batch[0]), expected[:1])  # (1, H, W)
    torch.testing.assert_close(model.predict_proba(batch[0, 0].numpy()), expected[:1])  # (H, W)


@pytest.mark.parametrize(
    ("images", "message"),
    [
        (torch.zeros(2, 3, 32, 32), r"\(2, 3, 32, 32\) are not accepted.*\(B, 1, H, W\)"),
        (torch.zeros(1, 1, 1, 32, 32), "are not accepted"),
        (torch.zeros(32), "are not accepted"),
        (torch.zeros(1, 1, 64, 64), "64x64 but this model takes 32x32"),
        (torch.full((1, 32, 32), 255.0), r"float images must be in \[0, 1\]"),
        (torch.full((1, 32, 32), float("nan")), "NaN"),
        (torch.zeros(1, 32, 32, dtype=torch.int32), "dtype torch.int32"),
    ],
)
def test_predictions_refuse_other_inputs_with_the_reason(images, message):
    model = XrayClassifier(net=NET, optimizer=ADAM, image_size=32)
    with pytest.raises(ValueError, match=message):
        model.predict_proba(images)
