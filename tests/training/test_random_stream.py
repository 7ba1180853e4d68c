"""A resumed fit draws the numbers the uninterrupted fit would have; crafted streams are refused."""

from __future__ import annotations

import copy
import logging
import random

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from pneumonia.errors import CheckpointError
from pneumonia.training.random_stream import (
    RandomStreamCheckpoint,
    capture,
    check,
    check_recorded_stream,
    restore,
)


def _draws() -> tuple:
    return torch.rand(4).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)]


def test_a_captured_stream_repeats_its_draws_from_every_generator():
    state = capture()
    first = _draws()
    restore(state)
    assert _draws() == first


class _Noisy(L.LightningModule):
    """A linear model trained on shuffled batches with random noise, as dropout and augmentation
    draw it."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        noisy = x + torch.randn_like(x) + float(np.random.rand()) + random.random()
        return torch.nn.functional.mse_loss(self.linear(noisy).squeeze(1), y)

    def validation_step(self, batch, batch_idx):
        self.log(
            "val/loss", torch.nn.functional.mse_loss(self.linear(batch[0]).squeeze(1), batch[1])
        )

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _fit(folder, max_epochs: int, ckpt_path=None, **trainer_settings) -> torch.Tensor:
    L.seed_everything(0)
    data = TensorDataset(torch.randn(40, 3), torch.randn(40))
    trainer = L.Trainer(
        max_epochs=max_epochs, accelerator="cpu", logger=False, enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[RandomStreamCheckpoint(), ModelCheckpoint(dirpath=folder, save_last=True)],
        **trainer_settings,
    )  # fmt: skip
    model = _Noisy()
    trainer.fit(
        model,
        DataLoader(data, batch_size=8, shuffle=True),
        DataLoader(data, batch_size=8),
        ckpt_path=ckpt_path,
    )
    return model.linear.weight.detach().clone()


def test_a_resumed_fit_trains_what_the_uninterrupted_fit_trained(tmp_path):
    uninterrupted = _fit(tmp_path / "a", max_epochs=3)
    _fit(tmp_path / "b", max_epochs=1)
    resumed = _fit(tmp_path / "b", max_epochs=3, ckpt_path=tmp_path / "b" / "last.ckpt")
    assert torch.equal(resumed, uninterrupted)


@pytest.mark.parametrize("reload_every", [0, 1])
def test_a_checkpoint_written_before_its_epoch_ended_resumes_from_the_next_epoch_alike(
    tmp_path, reload_every
):
    # Validating every second epoch, Lightning saves at the validation, before the epoch ends,
    # and on resume finishes that epoch with a loader iterator of its own; reloading loaders
    # makes the next epoch's iterator before that epoch's first hook.
    every_second = {"check_val_every_n_epoch": 2, "reload_dataloaders_every_n_epochs": reload_every}
    uninterrupted = _fit(tmp_path / "a", max_epochs=4, **every_second)
    _fit(tmp_path / "b", max_epochs=2, **every_second)
    last = tmp_path / "b" / "last.ckpt"
    recorded = torch.load(last, weights_only=True)["callbacks"]["RandomStreamCheckpoint"]
    assert recorded["saved"] == "after_training" and recorded["loader"] == "in-process"
    assert torch.equal(_fit(tmp_path / "b", 4, ckpt_path=last, **every_second), uninterrupted)


def test_a_checkpoint_written_within_an_epoch_says_the_resume_will_differ(tmp_path, caplog):
    _fit(tmp_path, max_epochs=3, max_steps=7)  # five batches an epoch: cut within the second
    last = tmp_path / "last.ckpt"
    recorded = torch.load(last, weights_only=True)["callbacks"]["RandomStreamCheckpoint"]
    assert recorded["saved"] == "mid_epoch"
    with caplog.at_level(logging.WARNING, logger="pneumonia.training.random_stream"):
        _fit(tmp_path, max_epochs=3, ckpt_path=last)
    assert "was written within an epoch, at step 7" in caplog.text


def test_a_checkpoint_without_a_stream_resumes_from_a_fresh_one_and_says_so(tmp_path, caplog):
    _fit(tmp_path, max_epochs=1)
    last = tmp_path / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    del checkpoint["callbacks"][RandomStreamCheckpoint.__qualname__]
    torch.save(checkpoint, last)
    with caplog.at_level(logging.INFO, logger="pneumonia.training.random_stream"):
        _fit(tmp_path, max_epochs=2, ckpt_path=last)
    assert "holds no random stream" in caplog.text


def _recorded() -> dict:
    return {"world_size": 1, "streams": capture()}


def _set(path: str, value):
    def tamper(state: dict) -> None:
        *parents, key = path.split("/")
        node = state
        for parent in parents:
            node = node[parent]
        node[key] = value

    return tamper


def _cuda_state(offset: int) -> torch.Tensor:
    return torch.tensor(
        list((7).to_bytes(8, "little") + offset.to_bytes(8, "little")), dtype=torch.uint8
    )


_TORCH = torch.get_rng_state()


@pytest.mark.parametrize(
    ("tamper", "named"),
    [
        (_set("streams", None), "no 'streams'"),
        (_set("world_size", 0), "world_size 0"),
        (_set("world_size", 2**80), "world_size"),
        (_set("saved", "whenever"), "saved='whenever'"),
        (_set("streams/torch", torch.zeros(10, dtype=torch.uint8)), "'torch'"),
        (_set("streams/torch", _TORCH.float()), "'torch'"),
        (_set("streams/torch", torch.zeros_like(_TORCH)), "'torch' is not a generator state"),
        (_set("streams/torch", torch.stack([_TORCH, _TORCH], 1)[:, 0]), "contiguous"),
        (_set("streams/torch", _TORCH.to("meta")), "CPU tensor"),
        (_set("streams/torch", _TORCH.to_sparse()), "dense"),
        (_set("streams/torch.cuda", [torch.zeros(3, dtype=torch.uint8)]), "'torch.cuda[0]'"),
        (_set("streams/torch.cuda", [_cuda_state(6)]), "offset 6, not a multiple of 4"),
        (_set("streams/torch.cuda", "none"), "'torch.cuda' is not a list"),
        (_set("streams/numpy/keys", torch.full((624,), 2**33)), "32-bit words"),
        (_set("streams/numpy/keys", torch.zeros(5, dtype=torch.int64)), "624 int64 numbers"),
        (_set("streams/numpy/keys", torch.zeros(624, dtype=torch.int64).to("meta")), "CPU"),
        (_set("streams/numpy/keys", torch.zeros(624, dtype=torch.uint64)), "624 int64 numbers"),
        (_set("streams/numpy/keys", torch.zeros(624, dtype=torch.int64).to_sparse()), "dense"),
        (_set("streams/numpy/position", 9999), "position 9999"),
        (_set("streams/numpy/has_gauss", 2**70), "Gaussian cache"),
        (_set("streams/numpy/has_gauss", -5), "Gaussian cache"),
        (_set("streams/numpy/cached_gaussian", float("nan")), "Gaussian cache"),
        (_set("streams/numpy/cached_gaussian", "x"), "Gaussian cache"),
        (_set("streams/python/words", torch.zeros(3, dtype=torch.int64)), "'python'"),
        (_set("streams/python/words", torch.zeros(625)), "int64"),
        (_set("streams/python/words", torch.zeros(625, dtype=torch.int64).to("meta")), "CPU"),
        (_set("streams/python/version", "three"), "'python'"),
        (_set("streams/python/gauss_next", "not a number"), "gauss_next"),
    ],
)  # fmt: skip
def test_a_stream_that_cannot_be_restored_is_refused_naming_the_entry(tamper, named):
    state = _recorded()
    tamper(state)
    with pytest.raises(CheckpointError, match="ckpt-x") as error:
        check(state, "ckpt-x")
    assert named in str(error.value)


def test_a_recorded_stream_is_checked_before_a_resume_and_none_passes():
    crafted = _recorded()
    crafted["streams"]["numpy"]["position"] = -1
    with pytest.raises(CheckpointError, match="position -1"):
        check_recorded_stream({"callbacks": {"RandomStreamCheckpoint": crafted}}, "last.ckpt")
    check_recorded_stream({"callbacks": {"RandomStreamCheckpoint": _recorded()}}, "last.ckpt")
    check_recorded_stream({"callbacks": {}}, "last.ckpt")  # a checkpoint from before the record
    for callbacks in ([1], {"RunCheckpoint": 1}):
        with pytest.raises(CheckpointError, match="not a mapping of mappings"):
            check_recorded_stream({"callbacks": callbacks}, "last.ckpt")
    check_recorded_stream(copy.deepcopy({}), "last.ckpt")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cuda_stream_is_recorded_checked_and_restored():
    torch.cuda.manual_seed(0)
    torch.rand(5, device="cuda")  # the offset moves on from the seed's
    state = capture()
    assert len(state["torch.cuda"]) == torch.cuda.device_count()
    check({"world_size": 1, "streams": state}, "last.ckpt")  # a real state passes the checks
    first = torch.rand(4, device="cuda").cpu()
    restore(state)
    assert torch.equal(torch.rand(4, device="cuda").cpu(), first)
