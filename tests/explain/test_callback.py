"""The attribution-map callback inside real (short) training, validation and testing."""

import pickle

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from pneumonia.data.datamodule import ChestXrayDataModule
from pneumonia.explain.callback import AttributionMapsCallback
from pneumonia.explain.methods import ClassScores
from pneumonia.explain.rendering.raster import CAPTION_HEIGHT, TITLE_HEIGHT
from pneumonia.model.classifier import XrayClassifier
from pneumonia.training.callbacks import RunCheckpoint

pytestmark = pytest.mark.integration
NET = {
    "_target_": "pneumonia.model.study_cnn.StudyCNN",
    "image_size": 64,
    "channels": [8, 16, 16],
    "hidden_features": 16,
}


def _setup(small_root, cache_dir, tmp_path, **callback_args):
    datamodule = ChestXrayDataModule(
        small_root, image_size=64, batch_size=16, cache_dir=cache_dir, decode_workers=1
    )
    module = XrayClassifier(
        net=NET, optimizer={"_target_": "torch.optim.Adam", "lr": 1e-3}, image_size=64
    )
    callback = AttributionMapsCallback(dirpath=tmp_path / "maps", num_images=4, **callback_args)
    trainer = L.Trainer(
        max_epochs=2,
        limit_train_batches=2,
        logger=TensorBoardLogger(tmp_path, name="tb", version=""),
        callbacks=[callback],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return datamodule, module, callback, trainer


def test_maps_of_the_same_images_every_epoch(small_root, cache_dir, tmp_path):
    datamodule, module, callback, trainer = _setup(small_root, cache_dir, tmp_path)
    trainer.fit(module, datamodule=datamodule)
    assert sorted(p.name for p in (tmp_path / "maps").glob("*.png")) == [
        "val_epoch000.png",
        "val_epoch001.png",
    ]
    # Half of each class, the first of each in the validation set's order.
    val = datamodule.dataset("val")
    labels = val.labels.tolist()
    chosen = [i for i, y in enumerate(labels) if y == 0][:2] + [
        i for i, y in enumerate(labels) if y == 1
    ][:2]
    assert callback.labels == [0, 0, 1, 1]
    assert torch.equal(callback.images, torch.stack([val[i][0] for i in chosen]))
    assert len(callback.seconds) == 2 and (tmp_path / "maps" / "timings.json").is_file()
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0}).Reload()
    assert len(events.Images("explanations/guided_gradcam/val")) == 2
    # The X-ray row (below the title and captions) is pixel-identical from one epoch to the next.
    first, second = (
        np.asarray(Image.open(tmp_path / "maps" / f"val_epoch00{i}.png")) for i in (0, 1)
    )
    xray_row = slice(TITLE_HEIGHT + CAPTION_HEIGHT, TITLE_HEIGHT + CAPTION_HEIGHT + 128)
    np.testing.assert_array_equal(first[xray_row], second[xray_row])
    assert not np.array_equal(first, second)  # while the maps change as the model trains


def test_grids_and_confusion_matrices_share_their_validation_metrics_step(
    small_root, cache_dir, tmp_path
):
    # At global_step they lay one step past their epoch's checkpoint, and the purge of a resume
    # from it dropped them from TensorBoard.
    datamodule, module, _, trainer = _setup(small_root, cache_dir, tmp_path)
    trainer.fit(module, datamodule=datamodule)
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0}).Reload()
    metric_steps = [e.step for e in events.Scalars("val/balanced_accuracy")]
    assert metric_steps == [1, 3]  # two training batches an epoch
    for tag in ("explanations/guided_gradcam/val", "val/confusion_matrix"):
        assert [e.step for e in events.Images(tag)] == metric_steps, tag


def _resumable(small_root, cache_dir, tmp_path, epochs, **trainer_args):
    datamodule, module, callback, _ = _setup(small_root, cache_dir, tmp_path)
    checkpoints = RunCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    trainer = L.Trainer(
        max_epochs=epochs, limit_train_batches=2, logger=False, callbacks=[callback, checkpoints],
        enable_progress_bar=False, enable_model_summary=False, **trainer_args,
    )  # fmt: skip
    return datamodule, module, callback, trainer


def _fit_and_lose_the_last_grid(small_root, cache_dir, tmp_path, epochs):
    """Fit, then delete the last epoch's grid, as a kill while the background thread wrote it
    (after the checkpoint) leaves the run; return the grid's path and its bytes."""
    datamodule, module, _, trainer = _resumable(small_root, cache_dir, tmp_path, epochs=epochs)
    trainer.fit(module, datamodule=datamodule)
    grid = tmp_path / "maps" / f"val_epoch{epochs - 1:03d}.png"
    drawn = grid.read_bytes()
    grid.unlink()
    return grid, drawn


def test_a_resume_redraws_the_grid_a_kill_lost_from_the_checkpoints_weights(
    small_root, cache_dir, tmp_path
):
    grid, drawn = _fit_and_lose_the_last_grid(small_root, cache_dir, tmp_path, epochs=1)
    # Whether the grid came after a whole epoch is the restored loops' to say, not the record's:
    # a record saying otherwise drew a second copy under another name.
    path = tmp_path / "ckpt" / "last.ckpt"
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["callbacks"]["AttributionMapsCallback"]["last_fit_grid"]["within_epoch"] = True
    torch.save(checkpoint, path)
    datamodule, module, callback, trainer = _resumable(small_root, cache_dir, tmp_path, epochs=2)
    was_training = []
    module.on_train_batch_start = lambda *args: was_training.append(module.net.training)
    trainer.fit(module, datamodule=datamodule, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert grid.read_bytes() == drawn  # the same weights, threshold and images: the same grid
    assert (tmp_path / "maps" / "val_epoch001.png").is_file() and len(callback.seconds) == 2
    assert was_training and all(was_training)  # training goes on in training mode

    # A grid that is there is not drawn again.
    datamodule, module, callback, trainer = _resumable(small_root, cache_dir, tmp_path, epochs=3)
    trainer.fit(module, datamodule=datamodule, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert len(callback.seconds) == 1

    # Nor is one missing from another run folder resumed from this checkpoint: nothing was lost.
    elsewhere = tmp_path / "elsewhere"
    datamodule, module, callback, trainer = _resumable(small_root, cache_dir, elsewhere, epochs=4)
    trainer.fit(module, datamodule=datamodule, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert [p.name for p in (elsewhere / "maps").glob("*.png")] == ["val_epoch003.png"]


def test_a_grid_lost_after_the_final_checkpoint_is_redrawn_with_nothing_left_to_train(
    small_root, cache_dir, tmp_path
):
    # Lightning skips training then (no on_train_start), and the grid was never redrawn.
    grid, drawn = _fit_and_lose_the_last_grid(small_root, cache_dir, tmp_path, epochs=2)
    datamodule, module, callback, trainer = _resumable(small_root, cache_dir, tmp_path, epochs=2)
    trainer.fit(module, datamodule=datamodule, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert grid.read_bytes() == drawn and len(callback.seconds) == 1


@pytest.mark.parametrize(
    "forged",
    [
        {"epoch": 10**300},  # a file name too long: the resume crashed
        {"epoch": 7},  # an epoch that never ran: its grid was invented
        {"step": 2**63},  # TensorBoard refused the step in the background thread
    ],
)
def test_a_forged_grid_record_neither_crashes_the_resume_nor_invents_a_grid(
    small_root, cache_dir, tmp_path, forged
):
    _fit_and_lose_the_last_grid(small_root, cache_dir, tmp_path, epochs=1)
    path = tmp_path / "ckpt" / "last.ckpt"
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["callbacks"]["AttributionMapsCallback"]["last_fit_grid"].update(forged)
    torch.save(checkpoint, path)

    datamodule, module, callback, trainer = _resumable(small_root, cache_dir, tmp_path, epochs=2)
    trainer.fit(module, datamodule=datamodule, ckpt_path=path)
    assert sorted(p.name for p in (tmp_path / "maps").glob("*.png")) == ["val_epoch001.png"]
    assert len(callback.seconds) == 1


@pytest.mark.parametrize(
    "state",
    [
        {},
        {"last_fit_grid": None},
        {"last_fit_grid": "epoch 3"},
        {"last_fit_grid": {"epoch": 1, "step": 3}},
        {"last_fit_grid": {"epoch": True, "step": 3, "global_step": 4}},
        {"last_fit_grid": {"epoch": -1, "step": 3, "global_step": 4}},
        {"last_fit_grid": {"epoch": "../../x", "step": 3, "global_step": 4}},
    ],
)
def test_a_recorded_grid_that_is_not_three_counts_and_a_folder_is_ignored(state):
    callback = AttributionMapsCallback()
    callback.load_state_dict(state)
    assert callback._resumed_grid is None
    valid = {"epoch": 1, "step": 3, "global_step": 4, "folder": "/runs/a/maps"}
    callback.load_state_dict({"last_fit_grid": {**valid, "folder": 7}})
    assert callback._resumed_grid is None
    callback.load_state_dict({"last_fit_grid": valid})
    assert callback._resumed_grid == valid


@pytest.mark.parametrize(
    "settings, names",
    [
        (
            {"max_epochs": 2, "limit_train_batches": 2, "val_check_interval": 0.5},
            ["val_epoch000.png", "val_epoch000_batch000001.png", "val_epoch001.png",
             "val_epoch001_batch000001.png"],
        ),
        (  # two validations between the same two optimiser steps, at global steps 1 and 1
            {"max_epochs": 1, "limit_train_batches": 4, "val_check_interval": 0.25,
             "accumulate_grad_batches": 2},
            ["val_epoch000.png", "val_epoch000_batch000001.png", "val_epoch000_batch000002.png",
             "val_epoch000_batch000003.png"],
        ),
    ],
)  # fmt: skip
def test_validations_inside_an_epoch_each_keep_their_grid(
    small_root, cache_dir, tmp_path, settings, names
):
    # With val_check_interval < 1 the second validation of an epoch overwrote the first one's PNG.
    datamodule, module, _, _ = _setup(small_root, cache_dir, tmp_path)
    trainer = L.Trainer(
        **settings, logger=TensorBoardLogger(tmp_path, name="tb", version=""),
        callbacks=[AttributionMapsCallback(dirpath=tmp_path / "maps", num_images=4)],
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(module, datamodule=datamodule)
    assert sorted(p.name for p in (tmp_path / "maps").glob("*.png")) == names
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0}).Reload()
    metric_steps = [e.step for e in events.Scalars("val/balanced_accuracy")]
    assert len(metric_steps) == len(names)
    assert [e.step for e in events.Images("explanations/guided_gradcam/val")] == metric_steps


def test_a_resume_redraws_a_lost_grid_of_a_validation_inside_an_epoch(
    small_root, cache_dir, tmp_path
):
    def resumable(epochs=1, **limits):
        return _resumable(small_root, cache_dir, tmp_path, epochs, val_check_interval=0.5, **limits)

    datamodule, module, _, trainer = resumable(max_steps=1)  # stops after the first validation
    trainer.fit(module, datamodule=datamodule)
    grid = tmp_path / "maps" / "val_epoch000_batch000001.png"
    drawn = grid.read_bytes()
    grid.unlink()
    datamodule, module, callback, trainer = resumable()
    trainer.fit(module, datamodule=datamodule, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert grid.read_bytes() == drawn and len(callback.seconds) == 2  # redrawn, then the end

    # The epoch's last validation saves its checkpoint before the epoch ends too (any
    # val_check_interval but 1.0): its lost grid came back as val_epoch000_batch000002.png.
    end_of_epoch = tmp_path / "maps" / "val_epoch000.png"
    drawn = end_of_epoch.read_bytes()
    end_of_epoch.unlink()
    datamodule, module, callback, trainer = resumable(epochs=2)
    trainer.fit(module, datamodule=datamodule, ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert end_of_epoch.read_bytes() == drawn
    assert sorted(p.name for p in (tmp_path / "maps").glob("val_epoch000*.png")) == [
        "val_epoch000.png",
        "val_epoch000_batch000001.png",
    ]


def test_every_n_epochs(small_root, cache_dir, tmp_path):
    datamodule, module, _, trainer = _setup(small_root, cache_dir, tmp_path, every_n_epochs=2)
    trainer.fit(module, datamodule=datamodule)
    assert [p.name for p in (tmp_path / "maps").glob("*.png")] == ["val_epoch001.png"]


def test_validate_and_test_run_in_inference_mode(small_root, cache_dir, tmp_path):
    datamodule, module, _, trainer = _setup(small_root, cache_dir, tmp_path, target="NORMAL")
    trainer.validate(module, datamodule=datamodule)
    trainer.test(module, datamodule=datamodule)
    names = sorted(p.name for p in (tmp_path / "maps").glob("*.png"))
    assert names == ["test.png", "val_epoch000.png"]


def test_callback_pickles_for_ddp_spawn_after_use(small_root, cache_dir, tmp_path):
    datamodule, module, callback, trainer = _setup(small_root, cache_dir, tmp_path)
    trainer.fit(module, datamodule=datamodule)
    clone = pickle.loads(pickle.dumps(callback))
    assert clone.labels == callback.labels and torch.equal(clone.images, callback.images)
    # The rebuilt attribution function is the same method: the same maps, bit for bit.
    pixels, targets = callback.images.float() / 255, torch.tensor(callback.labels)
    model = ClassScores(module)
    maps = callback.attribute(model, pixels, targets)
    assert maps.abs().sum() > 0 and torch.equal(clone.attribute(model, pixels, targets), maps)


def test_a_failed_background_write_is_raised_not_lost(small_root, cache_dir, tmp_path):
    (tmp_path / "maps").write_text("a file where the PNG folder should be")
    datamodule, module, _, trainer = _setup(small_root, cache_dir, tmp_path)
    with pytest.raises((FileExistsError, NotADirectoryError)):
        trainer.validate(module, datamodule=datamodule)


def test_captions_show_the_modules_calibrated_probability_and_threshold(
    small_root, cache_dir, tmp_path, monkeypatch
):
    from pneumonia.explain import callback as callback_module

    shown = []
    describe = callback_module.describe

    def recording_describe(label, probability, threshold):
        shown.append((probability, threshold))
        return describe(label, probability, threshold)

    monkeypatch.setattr(callback_module, "describe", recording_describe)
    # Two attribution calls (3 + 1 images) instead of one.
    datamodule, module, callback, trainer = _setup(small_root, cache_dir, tmp_path, batch_size=3)
    module.set_operating_point(threshold=0.8, temperature=1.0)
    trainer.validate(module, datamodule=datamodule)  # fits the temperature, then draws
    assert len(shown) == 4 and {t for _, t in shown} == {module.threshold}
    module.eval()
    with torch.no_grad():
        logits = module(callback.images.float() / 255)
    expected = module.probabilities_from_logits(logits)
    torch.testing.assert_close(torch.tensor([p for p, _ in shown]), expected)


@pytest.mark.parametrize("layer", ["augmentation", "net.nothing"])
def test_a_layer_grad_cam_cannot_use_is_refused_before_training(
    small_root, cache_dir, tmp_path, layer
):
    from pneumonia.errors import ConfigError

    datamodule, module, _, trainer = _setup(small_root, cache_dir, tmp_path, layer=layer)
    with pytest.raises(ConfigError, match=f"callbacks.attribution_maps.layer: layer '{layer}'"):
        trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == 0


def test_methods_without_a_layer_ignore_it(small_root, cache_dir, tmp_path):
    datamodule, module, _, trainer = _setup(
        small_root, cache_dir, tmp_path, method="saliency", layer="augmentation"
    )
    trainer.validate(module, datamodule=datamodule, verbose=False)
    assert (tmp_path / "maps" / "val_epoch000.png").is_file()
