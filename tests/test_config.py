"""Every option of every config group composes, and the objects it builds carry its settings."""

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint, ModelSummary
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.strategies import DDPStrategy
from omegaconf import OmegaConf
from sklearn.utils.class_weight import compute_class_weight

from pneumonia.data.class_weights import balanced_class_weights, no_class_weights
from pneumonia.data.datamodule import EmptySplitError
from pneumonia.explain.callback import AttributionMapsCallback
from pneumonia.model import registry
from pneumonia.model.classifier import XrayClassifier
from pneumonia.training.run import model_arguments, run
from tests.conftest import CONF_DIR, make_subset

GROUPS = [
    "data",
    "model",
    "optimizer",
    "scheduler",
    "class_weighting",
    "augmentation",
    "normalization",
    "operating_point",
    "trainer",
    "logger",
    "callbacks",
    "debug",
    "experiment",
    "hparams_search",
]
QUIET = {"logger": False, "enable_progress_bar": False, "enable_model_summary": False}


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def _classifier(cfg) -> XrayClassifier:
    return instantiate(cfg.model, _recursive_=False, **model_arguments(cfg))


def _prepared(cfg) -> tuple:
    """The config's DataModule, set up for fitting, and its model with the data's statistics."""
    datamodule = instantiate(cfg.data)
    module = _classifier(cfg)
    datamodule.prepare_data()
    datamodule.setup("fit")
    module.adopt_data_statistics(datamodule)
    return datamodule, module


@pytest.fixture(scope="module")
def unbalanced_root(data_root, tmp_path_factory) -> Path:
    """12 NORMAL and 32 PNEUMONIA real images: balanced class weights differ from 1, and the
    training split (about 35 images) fills a batch of 32."""
    root = make_subset(data_root, tmp_path_factory.mktemp("unbalanced"), per_class=32)
    for image in sorted((root / "train" / "NORMAL").iterdir())[12:]:
        image.unlink()
    return root


@pytest.mark.parametrize(("group", "option"), [(g, o) for g in GROUPS for o in _options(g)])
def test_every_group_option_composes_and_resolves(compose_config, group, option):
    cfg = compose_config(f"{group}={option}")
    # Resolving every interpolation catches a misspelt reference, which composing alone does not.
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert resolved["data"]["image_size"] == resolved["model"]["image_size"] == cfg.image_size


@pytest.mark.parametrize("option", _options("optimizer"))
def test_every_optimizer_option_reaches_the_models_optimizer(compose_config, option):
    cfg = compose_config(f"optimizer={option}")
    optimizer = _classifier(cfg).configure_optimizers()
    assert type(optimizer) is get_class(cfg.optimizer._target_)
    settings = {k: v for k, v in cfg.optimizer.items() if k != "_target_"}
    assert settings and {k: optimizer.param_groups[0][k] for k in settings} == settings


@pytest.mark.parametrize(
    ("option", "expected"), [("none", [1.0, 1.0]), ("balanced", [4 / (2 * 1), 4 / (2 * 3)])]
)
def test_class_weighting_options(compose_config, option, expected):
    weighting = instantiate(compose_config(f"class_weighting={option}").class_weighting)
    np.testing.assert_allclose(weighting(np.array([0, 1, 1, 1])), expected)


def test_cosine_scheduler_decays_to_zero_over_the_runs_epochs(compose_config):
    cfg = compose_config("scheduler=cosine", "trainer.max_epochs=4")
    config = _classifier(cfg).configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert config["lr_scheduler"]["interval"] == "epoch"
    rates = []
    for _ in range(4):
        optimizer.step()
        scheduler.step()
        rates.append(optimizer.param_groups[0]["lr"])
    lr = cfg.optimizer.lr
    np.testing.assert_allclose(rates, [lr * (1 + np.cos(np.pi * e / 4)) / 2 for e in (1, 2, 3, 4)])
    assert rates[-1] == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("preset", [[], ["experiment=robust_cnn"]])
def test_scheduler_none_keeps_or_drops_any_schedule(compose_config, preset):
    assert compose_config(*preset, "scheduler=none").scheduler is None
    assert compose_config(*preset, "scheduler=cosine").scheduler._target_.endswith("AnnealingLR")
    assert compose_config().scheduler is None  # the study's default


def _built_as(objects: list, kinds: list[type]) -> bool:
    """``objects`` are instances of ``kinds``, one each, in order (subclasses count)."""
    return len(objects) == len(kinds) and all(
        isinstance(obj, kind) for obj, kind in zip(objects, kinds, strict=True)
    )


@pytest.mark.parametrize(
    ("option", "kinds"),
    [
        ("all", [TensorBoardLogger, CSVLogger]),
        ("csv", [CSVLogger]),
        ("tensorboard", [TensorBoardLogger]),
    ],
)
def test_logger_options_log_into_the_run_folder(compose_config, option, kinds):
    cfg = compose_config(f"logger={option}")
    loggers = [instantiate(node) for node in cfg.logger.values()]
    assert _built_as(loggers, kinds)
    for logger in loggers:
        assert Path(logger.log_dir).parent == Path(cfg.paths.output_dir)


@pytest.mark.parametrize(
    ("option", "kinds"),
    [
        ("default", [ModelCheckpoint, ModelSummary, AttributionMapsCallback]),
        ("early_stopping", [ModelCheckpoint, ModelSummary, AttributionMapsCallback, EarlyStopping]),
        ("none", []),
    ],
)
def test_callback_options_build_their_callbacks(compose_config, option, kinds):
    cfg = compose_config(f"callbacks={option}")
    callbacks = [instantiate(node) for node in (cfg.callbacks or {}).values()]
    assert _built_as(callbacks, kinds)
    for callback in callbacks:
        if isinstance(callback, ModelCheckpoint):
            assert Path(callback.dirpath) == Path(cfg.paths.output_dir, "checkpoints")
            assert callback.monitor == cfg.optimized_metric and callback.mode == "max"
        if isinstance(callback, AttributionMapsCallback):
            assert callback.dirpath == Path(cfg.paths.output_dir, "explanations")


def test_cpu_and_default_trainers_build_a_one_device_cpu_trainer(compose_config):
    for option in ("cpu", "default"):
        trainer = instantiate(compose_config(f"trainer={option}").trainer, **QUIET)
        assert type(trainer.accelerator).__name__ == "CPUAccelerator" and trainer.num_devices == 1


def test_gpu_trainer_uses_bf16_mixed_precision_and_refuses_a_machine_without_gpu(compose_config):
    cfg = compose_config("trainer=gpu")
    if torch.cuda.is_available():
        trainer = instantiate(cfg.trainer, **QUIET)
        assert type(trainer.accelerator).__name__ == "CUDAAccelerator"
    else:
        with pytest.raises(InstantiationException, match="gpu"):
            instantiate(cfg.trainer, **QUIET)
        trainer = instantiate(cfg.trainer, accelerator="cpu", **QUIET)
    assert trainer.precision == "bf16-mixed"


def test_ddp_trainer_runs_two_processes(compose_config):
    cfg = compose_config("trainer=ddp")
    trainer = instantiate(cfg.trainer, accelerator="cpu", **QUIET)
    assert isinstance(trainer.strategy, DDPStrategy) and trainer.num_devices == 2


@pytest.mark.parametrize("option", _options("debug"))
def test_debug_options_reach_the_trainer(compose_config, option):
    trainer = instantiate(compose_config(f"debug={option}").trainer, **QUIET)
    settings = OmegaConf.load(CONF_DIR / "debug" / f"{option}.yaml").trainer
    assert settings and {k: getattr(trainer, k) for k in settings} == dict(settings)


def test_one_image_size_reaches_the_network_and_the_images(compose_config, unbalanced_root):
    cfg = compose_config("image_size=96", f"data.root={unbalanced_root}")
    module = _classifier(cfg).eval()
    assert module.hparams.image_size == 96
    with pytest.raises(
        RuntimeError, match="shapes cannot be multiplied"
    ):  # a network built for another size refuses 96 px
        _classifier(compose_config("image_size=128"))(torch.zeros(1, 1, 96, 96))
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    images, _ = next(iter(datamodule.val_dataloader()))
    assert images.shape[1:] == (1, 96, 96)
    assert module(images).shape == (len(images),)


@pytest.mark.parametrize(
    ("preset", "weighting"),
    [("study_unweighted", no_class_weights), ("study_weighted", balanced_class_weights)],
)
def test_study_presets_train_with_the_study_setup(
    compose_config, unbalanced_root, preset, weighting
):
    cfg = compose_config(f"experiment={preset}", f"data.root={unbalanced_root}")
    datamodule, module = _prepared(cfg)
    trainer: L.Trainer = instantiate(
        cfg.trainer, max_steps=2, limit_val_batches=0, enable_checkpointing=False, **QUIET
    )
    before = [p.detach().clone() for p in module.parameters()]
    trainer.fit(module, datamodule=datamodule)

    # Two batches were trained, the first a full batch of 32 images of 128 px.
    assert trainer.global_step == 2
    assert all(not torch.equal(a, b) for a, b in zip(before, module.parameters(), strict=True))
    images, _ = next(iter(datamodule.train_dataloader()))
    assert images.shape == (32, 1, 128, 128)
    # Adam with the study's learning rate and L2 penalty, 15 epochs, an 80/10/10 split.
    (optimizer,) = trainer.optimizers
    assert type(optimizer) is torch.optim.Adam
    assert optimizer.param_groups[0]["lr"] == 0.00175
    assert optimizer.param_groups[0]["weight_decay"] == 0.0001
    assert trainer.max_epochs == 15 and datamodule.split_fractions == (0.8, 0.1, 0.1)
    # The loss weights the preset's scheme computed from the training labels.
    train_labels = datamodule.dataset("train").labels.numpy().astype(int)
    np.testing.assert_allclose(module.hparams.class_weights, weighting(train_labels))
    balanced = compute_class_weight("balanced", classes=np.array([0, 1]), y=train_labels)
    assert (preset == "study_weighted") == np.allclose(module.hparams.class_weights, balanced)


RECIPE_OPTIONS = [
    (group, option)
    for group in ("augmentation", "normalization", "operating_point", "scheduler", "model")
    for option in _options(group)
]


@pytest.mark.parametrize(("group", "option"), RECIPE_OPTIONS)
def test_every_recipe_option_is_built_into_the_model_and_trains_a_few_batches(
    compose_config, unbalanced_root, group, option
):
    cfg = compose_config(f"{group}={option}", f"data.root={unbalanced_root}", "image_size=64")
    datamodule, module = _prepared(cfg)
    trainer: L.Trainer = instantiate(
        cfg.trainer, max_steps=2, limit_val_batches=1, num_sanity_val_steps=0,
        val_check_interval=2, enable_checkpointing=False, **QUIET,
    )  # fmt: skip
    before = [p.detach().clone() for p in module.parameters()]
    trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == 2
    assert any(not torch.equal(a, b) for a, b in zip(before, module.parameters(), strict=True))
    # What the option configures is what the checkpoint records and what the model runs.
    node = None if cfg[group] is None else OmegaConf.to_container(cfg[group], resolve=True) or None
    recorded = module.hparams["net" if group == "model" else group]
    if group == "model":
        node = node["net"]
    if group == "scheduler" and node is None:  # scheduler=none
        assert not trainer.lr_scheduler_configs
    elif group == "scheduler":
        node.pop("interval")
        recorded = {k: v for k, v in recorded.items() if k != "interval"}
        assert type(trainer.lr_scheduler_configs[0].scheduler).__name__ in node["_target_"]
    assert recorded == node or (node is None and recorded is None)
    built = {
        "augmentation": module.augmentation,
        "normalization": module.normalization,
        "model": module.net,
    }.get(group)
    if built is not None:
        expected = registry.REGISTRIES["net" if group == "model" else group][node["_target_"]]
        assert type(built) is expected
    assert "val/threshold" in trainer.callback_metrics


def test_defaults_are_the_study_unweighted_setup(compose_config):
    default, preset = compose_config(), compose_config("experiment=study_unweighted")
    for key in ("image_size", "optimizer", "class_weighting", "model", "trainer", "data"):
        assert default[key] == preset[key], key


def test_an_evaluation_into_a_training_run_folder_is_refused_before_writing(
    compose_config, tmp_path
):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "run_status.json").write_text('{"status": "completed"}')
    cfg = compose_config("ckpt_path=last", f"paths.output_dir={run_dir}", config_name="eval")
    from pneumonia.errors import ConfigError

    with pytest.raises(ConfigError, match=f"{run_dir} holds a training run"):
        run(cfg)
    assert (run_dir / "run_status.json").read_text() == '{"status": "completed"}'


def test_eval_config_needs_a_checkpoint_and_tests_every_image_of_a_one_class_folder(
    compose_config, unbalanced_root
):
    # fit=false routes the run to evaluation, which refuses to start without a checkpoint.
    with pytest.raises(ValueError, match="evaluation needs a checkpoint"):
        run(compose_config("seed=null", config_name="eval"))  # no global seeding as a side effect
    folder = unbalanced_root / "train" / "NORMAL"
    cfg = compose_config(
        "ckpt_path=x.ckpt", f"data.root={folder}", "image_size=64", config_name="eval"
    )
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("test")
    assert len(datamodule.dataset("test")) == 12
    for split in ("train", "val"):
        with pytest.raises(EmptySplitError):
            datamodule.dataset(split)


def test_data_root_follows_the_environment(compose_config, monkeypatch):
    monkeypatch.setenv("PNEUMONIA_DATA", "/somewhere/chest_xray")
    assert compose_config().data.root == "/somewhere/chest_xray"
    monkeypatch.delenv("PNEUMONIA_DATA")
    assert Path(compose_config().data.root) == Path(CONF_DIR.parent, "data", "chest_xray")


@pytest.mark.parametrize(("overrides", "jobs"), [([], 4), (["hydra.launcher.n_jobs=8"], 8)])
def test_the_shared_device_launcher_runs_several_joblib_trials_at_once(overrides, jobs):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            cfg = compose(
                "train",
                overrides=["hydra/launcher=shared_device", *overrides],
                return_hydra_config=True,
            )
    finally:
        GlobalHydra.instance().clear()
    launcher = cfg.hydra.launcher
    assert get_class(launcher._target_).__name__ == "JoblibLauncher"
    assert launcher.n_jobs == jobs
