"""DeviceBatches, and when the DataModule holds its splits on the training device."""

from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import DataLoader

from pneumonia.data.device_batches import DeviceBatches
from tests.data.test_datamodule import _datamodule


def _split(count: int = 10):
    pixels = torch.arange(count, dtype=torch.uint8).reshape(count, 1, 1, 1).expand(count, 1, 4, 4)
    return pixels.contiguous(), torch.arange(count, dtype=torch.float32)


def test_a_shuffled_pass_holds_every_image_once_and_passes_differ():
    pixels, labels = _split()
    batches = DeviceBatches(pixels, labels, batch_size=4, shuffle=True)
    assert len(batches) == 3
    torch.manual_seed(0)
    passes = [[(x, y) for x, y in batches] for _ in range(2)]
    for batch_list in passes:
        assert [len(y) for _, y in batch_list] == [4, 4, 2]
        seen = torch.cat([y for _, y in batch_list])
        assert sorted(seen.tolist()) == list(range(10))
        for x, y in batch_list:  # images stay with their labels
            assert torch.equal(x[:, 0, 0, 0].float(), y) and x.dtype == torch.uint8
    orders = [torch.cat([y for _, y in p]).tolist() for p in passes]
    assert orders[0] != orders[1] and orders[0] != sorted(orders[0])


def test_the_same_seed_gives_the_same_order():
    pixels, labels = _split()
    batches = DeviceBatches(pixels, labels, batch_size=3, shuffle=True)

    def order(seed):
        torch.manual_seed(seed)
        return torch.cat([y for _, y in batches]).tolist()

    assert order(5) == order(5) and order(5) != order(6)


def test_evaluation_keeps_the_given_order():
    pixels, labels = _split(7)
    batches = DeviceBatches(pixels, labels, batch_size=3, shuffle=False)
    assert [y.tolist() for _, y in batches] == [[0, 1, 2], [3, 4, 5], [6]]


def test_bad_arguments_are_named():
    pixels, labels = _split()
    with pytest.raises(ValueError, match="uint8"):
        DeviceBatches(pixels.float(), labels, 4, True)
    with pytest.raises(ValueError, match="do not match"):
        DeviceBatches(pixels, labels[:3], 4, True)
    with pytest.raises(ValueError, match="batch_size=0"):
        DeviceBatches(pixels, labels, 0, True)


def _trainer(device: str = "cpu", world_size: int = 1, overfit_batches: float = 0):
    return SimpleNamespace(
        overfit_batches=overfit_batches,
        world_size=world_size,
        global_rank=0,
        is_global_zero=True,
        strategy=SimpleNamespace(root_device=torch.device(device)),
    )


def test_the_datamodule_serves_its_splits_from_the_device_when_asked(small_root, cache_dir):
    dm = _datamodule(small_root, cache_dir, batch_size=4, batches_on_device=True)
    dm.prepare_data()
    dm.setup("fit")
    dm.trainer = _trainer()
    for split, loader in (("train", dm.train_dataloader()), ("val", dm.val_dataloader())):
        assert isinstance(loader, DeviceBatches)
        expected_pixels, expected_labels = dm.split_arrays(split)
        pixels = torch.cat([x for x, _ in loader])
        labels = torch.cat([y for _, y in loader])
        if split == "val":  # the same images, in the same order, as the DataLoader's
            assert torch.equal(pixels, expected_pixels) and torch.equal(labels, expected_labels)
        else:
            assert sorted(labels.tolist()) == sorted(expected_labels.tolist())
            assert len(pixels) == len(expected_pixels)


def test_a_datamodule_reused_on_another_device_holds_its_splits_there(small_root, cache_dir):
    dm = _datamodule(small_root, cache_dir, batch_size=4, batches_on_device=True)
    dm.prepare_data()
    dm.setup("fit")
    dm.trainer = _trainer()
    assert dm.train_dataloader().pixels.device.type == "cpu"
    dm.trainer = _trainer("meta")  # another device; meta holds shapes, no memory
    assert dm.train_dataloader().pixels.device.type == "meta"


def test_automatic_means_dataloaders_on_the_cpu_and_under_ddp(small_root, cache_dir):
    dm = _datamodule(small_root, cache_dir, batch_size=4)
    dm.prepare_data()
    dm.setup("fit")
    dm.trainer = _trainer()
    assert isinstance(dm.train_dataloader(), DataLoader)
    dm.trainer = _trainer(world_size=2)
    assert isinstance(dm.val_dataloader(), DataLoader)


def test_forcing_device_batches_under_ddp_is_a_clear_error(small_root, cache_dir):
    dm = _datamodule(small_root, cache_dir, batches_on_device=True)
    dm.prepare_data()
    dm.setup("fit")
    dm.trainer = _trainer(world_size=2)
    with pytest.raises(ValueError, match="batches_on_device=true needs one device"):
        dm.train_dataloader()
    with pytest.raises(ValueError, match="true, false or null"):
        _datamodule(small_root, cache_dir, batches_on_device="yes")


def test_overfitting_on_device_batches_trains_on_the_same_batches_each_epoch(small_root, cache_dir):
    dm = _datamodule(small_root, cache_dir, batch_size=4, batches_on_device=True)
    dm.prepare_data()
    dm.setup("fit")
    dm.trainer = _trainer(overfit_batches=2)
    loader = dm.train_dataloader()
    first, second = ([y.tolist() for _, y in loader] for _ in range(2))
    assert not loader.shuffle and first == second
    dm.trainer = _trainer()
    assert dm.train_dataloader().shuffle


def test_the_automatic_choice_is_made_once_for_every_split(small_root, cache_dir, monkeypatch):
    dm = _datamodule(small_root, cache_dir, batch_size=4)
    dm.prepare_data()
    dm.setup("fit")
    dm.trainer = _trainer("cuda")
    free = {"bytes": 10 * dm.cache.pixels.nbytes}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (free["bytes"], 2**40))
    assert dm.batch_device() == torch.device("cuda")
    free["bytes"] = 0  # what the allocator keeps after training: still the same choice
    assert dm.batch_device() == torch.device("cuda")
    other = _datamodule(small_root, cache_dir, batch_size=4)
    other.prepare_data()
    other.setup("fit")
    other.trainer = _trainer("cuda")
    assert other.batch_device() is None
    free["bytes"] = 10 * dm.cache.pixels.nbytes
    assert other.batch_device() is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_automatic_device_batches_on_one_gpu(small_root, cache_dir):
    dm = _datamodule(small_root, cache_dir, batch_size=4)
    dm.prepare_data()
    dm.setup("fit")
    dm.trainer = _trainer("cuda")
    loader = dm.train_dataloader()
    assert isinstance(loader, DeviceBatches) and loader.device.type == "cuda"
    x, y = next(iter(loader))
    assert x.is_cuda and y.is_cuda
