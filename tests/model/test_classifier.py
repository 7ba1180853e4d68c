import math
import warnings

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics import Metric

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


def _one_epoch_trainer(**settings) -> L.Trainer:
    """One quiet epoch without loggers or checkpoints."""
    return L.Trainer(
        max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, **settings,
    )  # fmt: skip


def test_checkpoint_round_trip_with_weights_only(tmp_path):
    module = XrayClassifier(
        net=NET,
        optimizer=ADAM,
        image_size=32,
        class_weights=[2.0, 0.5],
        pixel_mean=0.4,
        pixel_std=0.2,
    )
    trainer = _one_epoch_trainer()
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
    torch.testing.assert_close(module._loss(logits, targets, training=True), expected)
    torch.testing.assert_close(module._loss(logits, targets, training=False), per_sample.mean())


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
    torch.testing.assert_close(first, torch.sigmoid(model(images).double()))


def test_predictions_accept_one_image_or_a_batch_as_uint8_or_float():
    model = XrayClassifier(net=NET, optimizer=ADAM, image_size=32)
    batch = torch.randint(0, 256, (3, 1, 32, 32), dtype=torch.uint8)
    expected = model.predict_proba(batch)
    assert expected.shape == (3,)
    torch.testing.assert_close(model.predict_proba(batch.float() / 255), expected)
    torch.testing.assert_close(model.predict_proba(batch[0]), expected[:1])  # (1, H, W)
    torch.testing.assert_close(model.predict_proba(batch[0, 0].numpy()), expected[:1])  # (H, W)
    # load_grayscale's arrays are read-only: accepted without torch's non-writable warning.
    read_only = batch[0, 0].numpy().copy()
    read_only.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(model.predict_proba(read_only), expected[:1])


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


# ----- issue 7: recipe levers and the stored operating point ------------------------------------
STRONG = {
    "_target_": "pneumonia.model.augmentation.BatchAugmentation",
    "rotation": 15.0,
    "brightness": 0.2,
    "noise_p": 1.0,
    "noise_std": [0.05, 0.1],
}
BALANCED = {"_target_": "pneumonia.metrics.operating_point.MaxBalancedAccuracy"}


def _separable_loader(n=32, size=32, shift=0.0):
    """PNEUMONIA images brighter than NORMAL ones, so a trained model ranks them apart."""
    generator = torch.Generator().manual_seed(0)
    labels = (torch.arange(n) % 2).float()
    base = torch.rand((n, 1, size, size), generator=generator) * 80
    images = (base + 60 + 90 * labels[:, None, None, None] + shift).clamp(0, 255).to(torch.uint8)
    return DataLoader(TensorDataset(images, labels), batch_size=8)


def _fit(module, max_epochs=3, loader=None):
    trainer = L.Trainer(
        max_epochs=max_epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    loader = loader or _separable_loader()
    trainer.fit(module, train_dataloaders=loader, val_dataloaders=loader)
    return trainer


def test_augmentation_runs_in_training_steps_only_and_is_seeded():
    module = XrayClassifier(net=NET, optimizer=ADAM, image_size=32, augmentation=STRONG)
    images = next(iter(_separable_loader()))[0]
    module.train()
    L.seed_everything(3)
    first = module.preprocess(images, augment=True)
    L.seed_everything(3)
    again = module.preprocess(images, augment=True)
    torch.testing.assert_close(first, again)
    assert not torch.allclose(first, module.preprocess(images))
    # forward (eval, test, explain, predict) never augments, even in training mode
    torch.testing.assert_close(module.preprocess(images), module.preprocess(images))
    module.eval()
    torch.testing.assert_close(module.preprocess(images, augment=True), module.preprocess(images))
    first_call = module.predict_proba(images)
    torch.testing.assert_close(module.predict_proba(images), first_call)


def test_training_steps_augment_and_validation_and_test_steps_do_not():
    module = XrayClassifier(net=NET, optimizer=ADAM, image_size=32, augmentation=STRONG)
    calls = []
    augment = module.augmentation.forward

    def recording(x):
        out = augment(x)
        calls.append((module.trainer.state.stage.value, not torch.equal(out, x)))
        return out

    module.augmentation.forward = recording
    trainer = _fit(module, max_epochs=1)
    trainer.test(module, dataloaders=_separable_loader(), verbose=False)
    changed = [stage for stage, changed in calls if changed]
    assert changed == ["train"] * trainer.num_training_batches


def test_normalization_is_built_from_its_config_and_gets_the_training_statistics():
    per_image = XrayClassifier(
        net=NET,
        optimizer=ADAM,
        image_size=32,
        normalization={"_target_": "pneumonia.model.normalization.PerImageStandardization"},
    )
    images = next(iter(_separable_loader()))[0]
    x = per_image.preprocess(images)
    torch.testing.assert_close(x.mean(dim=(1, 2, 3)), torch.zeros(len(x)), atol=1e-4, rtol=0)

    dataset = XrayClassifier(net=NET, optimizer=ADAM, image_size=32)

    class Statistics:
        class_weights, pixel_mean, pixel_std = [1.0, 1.0], 0.3, 0.1

    dataset.adopt_data_statistics(Statistics())
    expected = (images.float() / 255 - 0.3) / 0.1
    torch.testing.assert_close(dataset.preprocess(images), expected)


def test_label_smoothing_softens_training_targets_only():
    module = XrayClassifier(net=NET, optimizer=ADAM, image_size=32, label_smoothing=0.2)
    logits = torch.tensor([2.0, -1.0])
    targets = torch.tensor([1.0, 0.0])
    smoothed = F.binary_cross_entropy_with_logits(logits, torch.tensor([0.9, 0.1]))
    torch.testing.assert_close(module._loss(logits, targets, training=True), smoothed)
    plain = F.binary_cross_entropy_with_logits(logits, targets)
    torch.testing.assert_close(module._loss(logits, targets, training=False), plain)


@pytest.mark.parametrize("bad", [-0.1, 0.5, "0.1"])
def test_label_smoothing_out_of_range_is_refused(bad):
    with pytest.raises((ValueError, TypeError), match="label_smoothing"):
        XrayClassifier(net=NET, optimizer=ADAM, image_size=32, label_smoothing=bad)


def test_threshold_and_temperature_are_fitted_on_validation_and_travel_with_the_checkpoint(
    tmp_path,
):
    L.seed_everything(0)
    module = XrayClassifier(net=NET, optimizer=ADAM, image_size=32, operating_point=BALANCED)
    trainer = _fit(module)
    assert module.threshold != 0.5 and float(module.temperature) != 1.0
    assert module.hparams.threshold == pytest.approx(module.threshold)
    metrics = trainer.callback_metrics
    assert float(metrics["val/threshold"]) == pytest.approx(module.threshold)
    assert float(metrics["val/temperature"]) == pytest.approx(float(module.temperature))

    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    restored = XrayClassifier.load_from_checkpoint(path, map_location="cpu")
    assert restored.threshold == pytest.approx(module.threshold)
    assert float(restored.temperature) == pytest.approx(float(module.temperature))
    images = next(iter(_separable_loader()))[0]
    logits = restored.eval()(images)
    expected = torch.sigmoid(logits.double() / float(module.temperature))
    torch.testing.assert_close(restored.predict_proba(images), expected)

    # Loading weights into another module (trainer.test(ckpt_path=...)) restores them too.
    other = XrayClassifier(net=NET, optimizer=ADAM, image_size=32, operating_point=BALANCED)
    other.load_state_dict(torch.load(path, weights_only=True)["state_dict"])
    assert other.threshold == pytest.approx(module.threshold)


def test_the_test_uses_the_stored_threshold_and_reports_the_study_threshold_too():
    L.seed_everything(0)
    module = XrayClassifier(net=NET, optimizer=ADAM, image_size=32, operating_point=BALANCED)
    trainer = _fit(module)
    module.set_operating_point(0.999, 1.0)  # calls almost everything NORMAL
    trainer.test(module, dataloaders=_separable_loader(), verbose=False)
    report = module.test_report
    assert report["threshold"] == pytest.approx(0.999)
    assert report["metrics"]["recall"] < report["metrics_at_0.5"]["recall"]
    assert report["threshold_rule"] == "MaxBalancedAccuracy"
    assert 0 <= report["calibration"]["ece"] <= 1
    assert module.test_outputs[0].shape == (32,)


def test_a_checkpoint_from_before_the_stored_operating_point_keeps_its_threshold(tmp_path):
    module = XrayClassifier(net=NET, optimizer=ADAM, image_size=32, threshold=0.3)
    trainer = _fit(module, max_epochs=1)
    path = tmp_path / "old.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    del checkpoint["state_dict"]["decision_threshold"], checkpoint["state_dict"]["temperature"]
    checkpoint["hyper_parameters"].pop("temperature")
    torch.save(checkpoint, path)
    restored = XrayClassifier.load_from_checkpoint(path, map_location="cpu")
    assert restored.threshold == pytest.approx(0.3)
    assert float(restored.temperature) == 1.0


def test_a_fixed_rule_keeps_the_threshold_whatever_validation_says():
    # The rule's threshold, not the module's own (0.3): a rule never applied passed as 0.5 = 0.5.
    fixed = {"_target_": "pneumonia.metrics.operating_point.FixedThreshold", "threshold": 0.7}
    module = XrayClassifier(
        net=NET, optimizer=ADAM, image_size=32, threshold=0.3, operating_point=fixed
    )
    _fit(module, max_epochs=2)
    assert module.threshold == pytest.approx(0.7)


@pytest.mark.parametrize(
    "role, node",
    [
        ("augmentation", {"_target_": "os.system", "command": "touch /tmp/x"}),
        ("normalization", {"_target_": "builtins.eval"}),
        ("operating_point", {"_target_": "pneumonia.model.study_cnn.StudyCNN"}),
    ],
)
def test_recipe_nodes_outside_their_registry_are_refused(role, node):
    from pneumonia.model.registry import UnsafeConfigError

    with pytest.raises(UnsafeConfigError, match=role):
        XrayClassifier(net=NET, optimizer=ADAM, image_size=32, **{role: node})


@pytest.mark.parametrize(
    "key, value", [("decision_threshold", 2.0), ("decision_threshold", -1.0), ("temperature", -1.0),
                   ("temperature", 0.0), ("temperature", float("nan"))],
)  # fmt: skip
def test_a_stored_operating_point_out_of_range_is_refused(tmp_path, key, value):
    from pneumonia.errors import CheckpointError

    module = XrayClassifier(net=NET, optimizer=ADAM, image_size=32)
    trainer = _fit(module, max_epochs=1)
    path = tmp_path / "crafted.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["state_dict"][key] = torch.tensor(value)
    torch.save(checkpoint, path)
    with pytest.raises(CheckpointError, match=f"{path}.*{key}"):
        XrayClassifier.load_from_checkpoint(path, map_location="cpu")


@pytest.mark.parametrize(
    "changes",
    [{"image_size": 4096}, {"net": {**NET, "hidden_features": 10**9}},
     {"net": {**NET, "channels": [4, 8, 2**24]}}],
)  # fmt: skip
def test_a_checkpoint_asking_for_a_network_too_large_to_build_is_refused_before_allocating(
    tmp_path, changes
):
    from pneumonia.errors import CheckpointError

    module = XrayClassifier(net=NET, optimizer=ADAM, image_size=32)
    path = tmp_path / "crafted.ckpt"
    _fit(module, max_epochs=1).save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["hyper_parameters"].update(changes)
    if "image_size" in changes:
        checkpoint["hyper_parameters"]["net"]["image_size"] = changes["image_size"]
    torch.save(checkpoint, path)
    with pytest.raises(CheckpointError, match=f"{path} was refused: .*(image_size=4096|weights)"):
        XrayClassifier.load_from_checkpoint(path, map_location="cpu")


@pytest.mark.parametrize("node", ["per_image", 3, ["a"], {"eps": 0.1}])
def test_a_recipe_node_that_is_not_a_target_mapping_is_refused(node):
    from pneumonia.model.registry import UnsafeConfigError

    with pytest.raises(UnsafeConfigError, match="normalization"):
        XrayClassifier(net=NET, optimizer=ADAM, image_size=32, normalization=node)


def test_bad_rule_arguments_are_refused_when_the_model_is_built():
    rule = {"_target_": "pneumonia.metrics.operating_point.TargetSensitivity", "sensitivity": 0}
    with pytest.raises(ValueError, match="sensitivity"):
        XrayClassifier(net=NET, optimizer=ADAM, image_size=32, operating_point=rule)


class _NaNNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return x.flatten(1).sum(1) * self.weight + float("nan")


def test_non_finite_outputs_leave_the_operating_point_alone_and_do_not_crash_validation():
    module = XrayClassifier(net=NET, optimizer=ADAM, image_size=32, operating_point=BALANCED)
    module.net = _NaNNet()
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.validate(module, dataloaders=_separable_loader(), verbose=False)
    assert module.threshold == 0.5 and float(module.temperature) == 1.0
    trainer.test(module, dataloaders=_separable_loader(), verbose=False)
    assert module.test_outputs is None and math.isnan(module.test_report["calibration"]["ece"])


def test_metrics_see_unsaturated_probabilities_at_a_small_temperature():
    module = XrayClassifier(net=NET, optimizer=ADAM, image_size=32)
    module.set_operating_point(0.5, 0.05)
    logits = torch.tensor([0.5, 1.0, 1.5], dtype=torch.float64)  # 10, 20, 30 after T
    probabilities = module.probabilities_from_logits(logits)
    assert probabilities.dtype == torch.float64 and len(set(probabilities.tolist())) == 3


def test_a_whole_run_schedule_is_not_extended_by_a_resume(tmp_path):
    from pneumonia.errors import ConfigError

    schedule = {
        "_target_": "pneumonia.training.schedulers.WarmupCosine",
        "total_steps": None,
        "interval": "step",
    }
    module = XrayClassifier(net=NET, optimizer=ADAM, image_size=32, scheduler=schedule)
    trainer = _fit(module, max_epochs=1)
    path = tmp_path / "one_epoch.ckpt"
    trainer.save_checkpoint(path)
    again = XrayClassifier(net=NET, optimizer=ADAM, image_size=32, scheduler=schedule)
    longer = L.Trainer(max_epochs=2, logger=False, enable_checkpointing=False,
                       enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    with pytest.raises(ConfigError, match="built for 4 optimiser steps.*max_epochs=2"):
        longer.fit(again, _separable_loader(), _separable_loader(), ckpt_path=path)


SCHEDULES = {
    "warmup_cosine": {"_target_": "pneumonia.training.schedulers.WarmupCosine",
                      "total_steps": 8, "interval": "step"},
    "onecycle": {"_target_": "torch.optim.lr_scheduler.OneCycleLR", "max_lr": 1e-3,
                 "total_steps": 8, "interval": "step"},
    "cosine": {"_target_": "torch.optim.lr_scheduler.CosineAnnealingLR", "T_max": 2},
}  # fmt: skip


class _LearningRates(L.Callback):
    def __init__(self) -> None:
        self.rates: list[float] = []

    def on_train_batch_start(self, trainer, *args) -> None:
        self.rates.append(trainer.optimizers[0].param_groups[0]["lr"])


def _two_epochs(schedule, ckpt_path=None) -> list[float]:
    """The learning rate of each step of a 2-epoch fit (of its second epoch when resumed)."""
    module = XrayClassifier(net=NET, optimizer=ADAM, image_size=32, scheduler=schedule)
    rates = _LearningRates()
    trainer = L.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, callbacks=[rates],
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(module, _separable_loader(), _separable_loader(), ckpt_path=ckpt_path)
    return rates.rates


def _resume_with_schedule(tmp_path, schedule, tamper=None) -> list[float]:
    module = XrayClassifier(net=NET, optimizer=ADAM, image_size=32, scheduler=schedule)
    path = tmp_path / "one_epoch.ckpt"
    _fit(module, max_epochs=1).save_checkpoint(path)  # half of the 2 epochs each schedule spans
    if tamper is not None:
        checkpoint = torch.load(path, weights_only=True)
        tamper(checkpoint)
        torch.save(checkpoint, path)
    return _two_epochs(schedule, ckpt_path=path)


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_an_honest_resume_keeps_its_schedule(tmp_path, name):
    whole = _two_epochs(SCHEDULES[name])
    resumed = _resume_with_schedule(tmp_path, SCHEDULES[name])
    assert len(whole) == 8 and len(set(whole)) > 1  # the schedule moves the rate
    assert resumed == whole[4:]  # the second epoch at the rates of the uninterrupted run


@pytest.mark.parametrize(
    ("name", "tamper", "named"),
    [("warmup_cosine", lambda c: c["lr_schedulers"][0].update(base_lrs=[0.01]), r"base_lrs: \[0.001\] -> \[0.01\]"),
     ("cosine", lambda c: c["lr_schedulers"][0].update(T_max=1000), "T_max: 2 -> 1000"),
     ("onecycle", lambda c: c["optimizer_states"][0]["param_groups"][0].update(max_lr=1.0),
      r"param_groups\[0\].max_lr: 0.001 -> 1.0")],
)  # fmt: skip
def test_a_tampered_schedule_is_refused_when_resumed(tmp_path, name, tamper, named):
    from pneumonia.errors import CheckpointError

    with pytest.raises(CheckpointError, match=f"schedule is not the configured one.*{named}"):
        _resume_with_schedule(tmp_path, SCHEDULES[name], tamper)


def test_a_run_of_unknown_length_cannot_fill_in_total_steps():
    schedule = {"_target_": "torch.optim.lr_scheduler.OneCycleLR", "max_lr": 0.01,
                "total_steps": None, "interval": "step"}  # fmt: skip
    module = XrayClassifier(net=NET, optimizer=ADAM, image_size=32, scheduler=schedule)
    trainer = L.Trainer(max_epochs=-1, max_steps=-1, max_time={"seconds": 5}, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False)  # fmt: skip
    with pytest.raises(ValueError, match="total_steps=null needs a run of known length"):
        trainer.fit(module, _separable_loader())


def test_every_epoch_value_is_logged_to_be_synchronised_across_ranks(monkeypatch):
    # Under DDP Lightning warns about (and does not reduce) epoch-level tensors logged without
    # sync_dist; this checks every logged value in one process, without starting DDP: a
    # torchmetrics object (which synchronises itself) or a tensor logged with sync_dist.
    module = XrayClassifier(net=NET, optimizer=ADAM, image_size=32, operating_point=BALANCED)
    calls: dict[str, tuple] = {}
    log = module.log

    def recording_log(name, value, *args, **kwargs):
        calls[name] = (value, kwargs)
        return log(name, value, *args, **kwargs)

    monkeypatch.setattr(module, "log", recording_log)
    trainer = _fit(module, max_epochs=1)
    trainer.test(module, dataloaders=_separable_loader(), verbose=False)
    stages = {name.split("/")[0] for name in calls}
    assert stages == {"train", "val", "test"}
    assert {"val/balanced_accuracy", "val/threshold", "test/auroc", "test/ece"} <= set(calls)
    unsynchronised = sorted(
        name
        for name, (value, kwargs) in calls.items()
        if not isinstance(value, Metric) and not kwargs.get("sync_dist")
    )
    assert unsynchronised == []
    # The losses are means over images, not over batches: 11 images in batches of 8 and 3.
    module = XrayClassifier(net=NET, optimizer=ADAM, image_size=32)
    uneven = DataLoader(_separable_loader(n=11).dataset, batch_size=8)
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.validate(module, dataloaders=uneven, verbose=False)
    images, labels = uneven.dataset.tensors
    module.eval()
    with torch.no_grad():
        expected = F.binary_cross_entropy_with_logits(module(images).float(), labels)
    torch.testing.assert_close(trainer.callback_metrics["val/loss"], expected)


def test_the_stored_operating_point_is_rank_zeros(monkeypatch):
    # Every rank fits the same numbers on the gathered outputs; the broadcast from rank zero makes
    # the buffers (and so every rank's decisions and checkpoints) identical by construction.
    L.seed_everything(0)
    module = XrayClassifier(net=NET, optimizer=ADAM, image_size=32, operating_point=BALANCED)
    sent = []

    def broadcast(obj, src=0):
        if not isinstance(obj, tuple):
            return obj  # Lightning's own broadcasts (e.g. of the log folder)
        sent.append((obj, src))
        return (0.25, 2.0)  # what rank zero fitted

    trainer = _one_epoch_trainer(num_sanity_val_steps=0)
    monkeypatch.setattr(trainer.strategy, "broadcast", broadcast)
    trainer.fit(module, train_dataloaders=_separable_loader(), val_dataloaders=_separable_loader())
    assert len(sent) == 1 and sent[0][1] == 0 and len(sent[0][0]) == 2
    assert module.threshold == 0.25 and float(module.temperature) == 2.0
    assert module.hparams.threshold == 0.25 and module.hparams.temperature == 2.0
    assert float(trainer.callback_metrics["val/threshold"]) == 0.25
    assert float(trainer.callback_metrics["val/temperature"]) == 2.0


def test_evaluation_runs_in_full_precision_under_bf16_training():
    """bf16 logits would tie images for AUROC and coarsen the fitted threshold and temperature."""
    torch.manual_seed(0)
    module = XrayClassifier(net=NET, optimizer=ADAM, image_size=32).eval()
    images = torch.randint(0, 256, (16, 1, 32, 32), dtype=torch.uint8)
    targets = (torch.arange(16) % 2).float()
    with torch.no_grad():
        full = module(images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert module(images).dtype == torch.bfloat16  # what autocast alone would give
            module._evaluation_step((images, targets), [module.val_metrics])
    logits = module.epoch_logits.compute()
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, full)


def test_bf16_mixed_training_on_the_cpu_fits_and_validates():
    torch.manual_seed(0)
    module = XrayClassifier(net=NET, optimizer=ADAM, image_size=32)
    trainer = _one_epoch_trainer(precision="bf16-mixed", accelerator="cpu")
    trainer.fit(module, _random_loader(), _random_loader())
    assert torch.isfinite(trainer.callback_metrics["val/loss"])
    assert all(p.dtype == torch.float32 for p in module.parameters())


@pytest.mark.parametrize(
    ("optimizer", "fused"),
    [
        ({"_target_": "torch.optim.Adam", "lr": 1e-3}, True),
        ({"_target_": "torch.optim.AdamW", "lr": 1e-3}, True),
        ({"_target_": "torch.optim.Adam", "lr": 1e-3, "foreach": True}, None),
        ({"_target_": "torch.optim.Adam", "lr": 1e-3, "fused": False}, False),
        ({"_target_": "torch.optim.SGD", "lr": 1e-3}, None),
    ],
)
def test_adam_steps_fused_unless_configured_and_the_hparams_keep_the_config(optimizer, fused):
    module = XrayClassifier(net=NET, optimizer=optimizer, image_size=32)
    built = module.configure_optimizers()
    assert built.defaults.get("fused") == fused
    assert dict(module.hparams.optimizer) == optimizer  # checkpoints record what was configured


def test_clipped_gradients_train_under_bf16_with_an_unfused_adam():
    # The divergence error advises trainer.gradient_clip_val=1.0; Lightning refuses to clip for
    # a fused optimizer under mixed precision, so clipping keeps Adam's step unfused.
    module = XrayClassifier(net=NET, optimizer=ADAM, image_size=32)
    trainer = _one_epoch_trainer(precision="bf16-mixed", accelerator="cpu", gradient_clip_val=1.0)
    trainer.fit(module, _random_loader(), _random_loader())
    assert trainer.optimizers[0].defaults.get("fused") is None
    assert torch.isfinite(trainer.callback_metrics["val/loss"])


def test_an_epoch_end_without_a_training_batch_logs_no_training_figures(monkeypatch):
    # A resume from a checkpoint written before its epoch ended re-enters that epoch's end; empty
    # metrics logged NaN over the killed run's real figures.
    module = XrayClassifier(net=NET, optimizer=ADAM, image_size=32)
    logged = []
    monkeypatch.setattr(module, "log", lambda name, *a, **k: logged.append(name))
    monkeypatch.setattr(module, "log_dict", lambda values, *a, **k: logged.extend(values))
    module.on_train_epoch_end()
    assert logged == []
    module.train_metrics.update(torch.tensor([0.9, 0.2]), torch.tensor([1, 0]))
    module.on_train_epoch_end()
    assert "train/balanced_accuracy" in logged and "train/precision" in logged
