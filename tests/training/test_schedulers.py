import itertools

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from pneumonia.model.classifier import XrayClassifier
from pneumonia.training.schedulers import WarmupCosine

NET = {
    "_target_": "pneumonia.model.study_cnn.StudyCNN",
    "image_size": 32,
    "channels": [4, 8, 8],
    "hidden_features": 8,
}


def _optimizer(lr=1.0):
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


def _rates(scheduler, steps):
    rates = []
    for _ in range(steps):
        rates.append(scheduler.get_last_lr()[0])
        scheduler.optimizer.step()
        scheduler.step()
    return rates


def test_warmup_rises_linearly_then_cosine_decays_to_the_floor():
    scheduler = WarmupCosine(
        _optimizer(2.0), total_steps=100, warmup_fraction=0.1, start_factor=0.1
    )
    rates = _rates(scheduler, 101)
    assert rates[0] == pytest.approx(0.2)
    assert rates[5] == pytest.approx(2.0 * (0.1 + 0.9 * 0.5))
    assert max(rates) == pytest.approx(2.0) and rates.index(max(rates)) == 10
    assert rates[55] == pytest.approx(1.0)  # half-way through the decay: half the peak
    assert all(a >= b for a, b in itertools.pairwise(rates[10:]))
    assert rates[100] == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"total_steps": 0},
        {"total_steps": 10.5},
        {"total_steps": 10, "warmup_fraction": 1.0},
        {"total_steps": 10, "start_factor": 0.0},
        {"total_steps": 10, "min_factor": 1.5},
    ],
)
def test_bad_schedule_settings_are_refused_by_name(kwargs):
    name = next(k for k in kwargs if k != "total_steps") if len(kwargs) > 1 else "total_steps"
    with pytest.raises(ValueError, match=name):
        WarmupCosine(_optimizer(), **kwargs)


class _LearningRates(L.Callback):
    def __init__(self):
        self.rates = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.rates.append(trainer.optimizers[0].param_groups[0]["lr"])


@pytest.mark.parametrize(
    "scheduler",
    [
        {
            "_target_": "pneumonia.training.schedulers.WarmupCosine",
            "total_steps": None,
            "warmup_fraction": 0.25,
            "interval": "step",
        },
        {
            "_target_": "torch.optim.lr_scheduler.OneCycleLR",
            "max_lr": 0.01,
            "total_steps": None,
            "interval": "step",
        },
    ],
)
def test_whole_run_schedules_learn_the_run_length_from_the_trainer(scheduler):
    images = torch.randint(0, 256, (32, 1, 32, 32), dtype=torch.uint8)
    loader = DataLoader(TensorDataset(images, (torch.arange(32) % 2).float()), batch_size=8)
    module = XrayClassifier(
        net=NET, optimizer={"_target_": "torch.optim.SGD", "lr": 0.01}, image_size=32,
        scheduler=scheduler,
    )  # fmt: skip
    rates = _LearningRates()
    trainer = L.Trainer(
        max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[rates], limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(module, train_dataloaders=loader)
    schedule = trainer.lr_scheduler_configs[0].scheduler
    assert schedule.total_steps == 8  # 2 epochs x 4 batches
    # rises, peaks near the configured rate, and ends well below it: one schedule over the run
    assert rates.rates[0] < max(rates.rates) <= 0.01 + 1e-12
    assert max(rates.rates) > 0.9 * 0.01
    assert rates.rates[-1] < 0.5 * max(rates.rates)
