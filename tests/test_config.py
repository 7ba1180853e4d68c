"""Every option of every config group composes and builds the object it names."""

from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger

from pneumonia.data.datamodule import ChestXrayDataModule
from pneumonia.model.classifier import XrayClassifier
from tests.conftest import CONF_DIR

GROUPS = [
    "data",
    "model",
    "optimizer",
    "scheduler",
    "class_weighting",
    "trainer",
    "logger",
    "callbacks",
    "debug",
    "experiment",
    "hparams_search",
]


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize(("group", "option"), [(g, o) for g in GROUPS for o in _options(g)])
def test_every_group_option_composes(compose_config, group, option):
    cfg = compose_config(f"{group}={option}")
    assert cfg.image_size > 0
    if group == "model":
        module = instantiate(cfg.model, optimizer=cfg.optimizer, _recursive_=False)
        assert isinstance(module, XrayClassifier)
        assert module(
            torch.zeros(2, 1, cfg.image_size, cfg.image_size, dtype=torch.uint8)
        ).shape == (2,)
    if group == "optimizer":
        optimizer = instantiate(cfg.optimizer, params=[torch.nn.Parameter(torch.zeros(1))])
        assert isinstance(optimizer, torch.optim.Optimizer)
    if group == "class_weighting":
        weights = instantiate(cfg.class_weighting)(torch.tensor([0, 1, 1, 1]).numpy())
        assert weights.shape == (2,)
    if group == "scheduler":
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        node = {k: v for k, v in cfg.scheduler.items() if k != "interval"}
        assert isinstance(
            instantiate(node, optimizer=optimizer), torch.optim.lr_scheduler.LRScheduler
        )
    if group in ("logger", "callbacks"):
        objects = [instantiate(node) for node in (cfg[group] or {}).values()]
        kind = Logger if group == "logger" else Callback
        assert all(isinstance(obj, kind) for obj in objects)
        assert objects or option == "none"
    if group == "trainer" and option in ("cpu", "default"):
        assert isinstance(instantiate(cfg.trainer, logger=False), L.Trainer)
    if group == "trainer" and option == "gpu":
        assert cfg.trainer.accelerator == "gpu" and cfg.trainer.precision == "bf16-mixed"
    if group == "trainer" and option == "ddp":
        assert cfg.trainer.strategy == "ddp" and cfg.trainer.devices == 2
    if group == "debug":
        assert cfg.task_name == "debug"


def test_the_data_and_the_model_follow_one_image_size(compose_config):
    cfg = compose_config("image_size=96")
    assert cfg.data.image_size == cfg.model.image_size == cfg.model.net.image_size == 96
    assert isinstance(instantiate(cfg.data), ChestXrayDataModule)


@pytest.mark.parametrize(
    ("preset", "weighting"),
    [("study_unweighted", "no_class_weights"), ("study_weighted", "balanced_class_weights")],
)
def test_study_presets_pin_the_study_setup(compose_config, preset, weighting):
    cfg = compose_config(f"experiment={preset}")
    assert cfg.trainer.max_epochs == 15
    assert cfg.data.batch_size == 32
    assert cfg.optimizer._target_ == "torch.optim.Adam"
    assert cfg.optimizer.lr == 0.00175 and cfg.optimizer.weight_decay == 0.0001
    assert cfg.image_size == 128
    assert list(cfg.data.split_fractions) == [0.8, 0.1, 0.1]
    assert cfg.class_weighting._target_.endswith(weighting)


def test_defaults_are_the_study_unweighted_setup(compose_config):
    default, preset = compose_config(), compose_config("experiment=study_unweighted")
    for key in ("image_size", "optimizer", "class_weighting", "model"):
        assert default[key] == preset[key]
    assert default.trainer.max_epochs == preset.trainer.max_epochs
    assert default.data.batch_size == preset.data.batch_size


def test_eval_config_needs_a_checkpoint_and_tests_every_image(compose_config):
    cfg = compose_config("ckpt_path=x.ckpt", config_name="eval")
    assert cfg.fit is False and list(cfg.data.split_fractions) == [0.0, 0.0, 1.0]


def test_data_root_follows_the_environment(compose_config, monkeypatch):
    monkeypatch.setenv("PNEUMONIA_DATA", "/somewhere/chest_xray")
    assert compose_config().data.root == "/somewhere/chest_xray"
    monkeypatch.delenv("PNEUMONIA_DATA")
    assert Path(compose_config().data.root) == Path(CONF_DIR.parent, "data", "chest_xray")
