"""A resume continues the same run: same model, same optimizer and schedule, same split."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pneumonia.errors import CheckpointError, SplitChangedError
from pneumonia.training.resume import ResumePoint, step_settings

NET = {"_target_": "pneumonia.model.study_cnn.StudyCNN", "image_size": 64}
SAVED = {
    "net": NET,
    "image_size": 64,
    "optimizer": {"_target_": "torch.optim.Adam", "lr": 0.00175},
    "scheduler": None,
    "split": {"root": "/data", "seed": 42, "split_fractions": [0.8, 0.1, 0.1], "images": 10},
}
POINT = ResumePoint(Path("/runs/a/checkpoints/last.ckpt"), SAVED, global_step=40, epoch=3)


def test_the_same_settings_resume():
    POINT.check_same_model(dict(SAVED))
    POINT.check_same_split(dict(SAVED["split"]))


@pytest.mark.parametrize(
    ("key", "value", "named"),
    [
        ("optimizer", {"_target_": "torch.optim.Adam", "lr": 0.5}, "optimizer="),
        ("scheduler", {"_target_": "torch.optim.lr_scheduler.CosineAnnealingLR", "T_max": 20}, "scheduler="),
        ("image_size", 96, "image_size=64, but this run configures image_size=96"),
        ("net", {**NET, "dropout": 0.1}, "net="),
    ],
)  # fmt: skip
def test_other_model_or_optimisation_settings_are_refused(key, value, named):
    with pytest.raises(CheckpointError, match=f"{POINT.path} was trained with {named}"):
        POINT.check_same_model({**SAVED, key: value})


TRAINING = {
    "data.batch_size": 32, "trainer.precision": "bf16-mixed", "trainer.accumulate_grad_batches": 1,
    "trainer.gradient_clip_val": None, "trainer.gradient_clip_algorithm": None,
}  # fmt: skip


@pytest.mark.parametrize(
    ("key", "value"),
    [("data.batch_size", 16), ("trainer.precision", "32-true"),
     ("trainer.accumulate_grad_batches", 3), ("trainer.gradient_clip_val", 0.001)],
)  # fmt: skip
def test_steps_taken_otherwise_are_refused(key, value):
    # Accepted before: the record then claimed the new value for epochs taken with the old one.
    point = ResumePoint(POINT.path, {**SAVED, "training": TRAINING}, global_step=40, epoch=3)
    point.check_same_training(dict(TRAINING), max_epochs=10)
    with pytest.raises(CheckpointError, match=f"trained with {key}=.*configures {key}={value!r}"):
        point.check_same_training({**TRAINING, key: value}, max_epochs=10)
    POINT.check_same_training({**TRAINING, key: value}, max_epochs=10)  # from before the record


def test_one_behaviour_has_one_spelling_and_is_not_refused():
    # precision=32 is "32-true" to Lightning; clipping at 0 is no clipping, whatever the algorithm.
    recorded = step_settings(32, "32-true", 1, None, None)
    point = ResumePoint(POINT.path, {**SAVED, "training": recorded}, global_step=40, epoch=3)
    for same in (step_settings(32, 32, None, 0, "norm"), step_settings(32, "32", 1, 0.0, None)):
        point.check_same_training(same, max_epochs=10)
    assert step_settings(32, "bf16", 1, 0.5, None)["trainer.precision"] == "bf16-mixed"
    assert step_settings(32, "bf16", 1, 0.5, None)["trainer.gradient_clip_algorithm"] == "norm"


def test_fewer_epochs_than_the_checkpoint_has_trained_are_refused():
    # It trained nothing, tested the old weights and recorded the smaller trainer.max_epochs.
    with pytest.raises(CheckpointError, match="has trained 4 epochs, but .*max_epochs=2"):
        POINT.check_same_training({}, max_epochs=2)
    POINT.check_same_training({}, max_epochs=4)  # the same run again: it tests what it has
    POINT.check_same_training({}, max_epochs=None)


def test_every_changed_split_setting_is_named_with_old_and_new_values():
    with pytest.raises(SplitChangedError) as raised:
        POINT.check_same_split({**SAVED["split"], "seed": 7, "images": 11})
    message = str(raised.value)
    assert "data.seed: 42 -> 7" in message and "number of images found: 10 -> 11" in message
    assert "data.root" not in message


def test_a_checkpoint_without_a_recorded_split_is_left_to_split_csv():
    ResumePoint(POINT.path, {**SAVED, "split": None}, 40, 3).check_same_split({"seed": 7})


def test_only_a_checkpoint_below_the_run_folder_is_a_resume_in_place():
    assert POINT.is_in("/runs/a") and not POINT.is_in("/runs/b")


def test_a_run_from_before_the_recipe_groups_resumes_with_their_defaults():
    new = {
        **SAVED,
        "augmentation": None,
        "normalization": {"_target_": "pneumonia.model.normalization.DatasetStandardization"},
        "operating_point": {
            "_target_": "pneumonia.metrics.operating_point.FixedThreshold",
            "threshold": 0.5,
        },
        "label_smoothing": 0.0,
    }
    POINT.check_same_model(new)  # SAVED has none of these keys
    strong = {"_target_": "pneumonia.model.augmentation.BatchAugmentation", "rotation": 5.0}
    with pytest.raises(CheckpointError, match="augmentation=None, but this run configures"):
        POINT.check_same_model({**new, "augmentation": strong})


def test_logs_continue_after_the_last_step_the_checkpoint_holds(tmp_path):
    told = []

    class Logger:
        def continue_after(self, step):
            told.append(step)

    # A checkpoint at global step 16 holds steps up to 15; the next batch logs at 16, which the
    # interrupted process may have logged already.
    ResumePoint(tmp_path / "last.ckpt", {}, 16, 2).continue_logs([Logger(), object()])
    assert told == [15]


def _optimizer_point(tmp_path, tamper=None, **adam):
    """A resume point with the state of Adam after one step on a tiny model, optionally tampered."""
    import torch

    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 2, 3), torch.nn.Flatten(), torch.nn.LazyLinear(1)
    )
    model(torch.rand(2, 1, 5, 5)).sum().backward()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4, **adam)
    optimizer.step()
    states = [optimizer.state_dict()]
    if tamper is not None:
        tamper(states[0])
    point = ResumePoint(tmp_path / "last.ckpt", SAVED, 1, 0, optimizer_states=states)
    config = {"_target_": "torch.optim.Adam", "lr": 1e-3, "weight_decay": 1e-4, **adam}
    return point, list(model.parameters()), config


def test_the_optimizer_state_of_the_same_model_and_settings_resumes(tmp_path):
    point, parameters, config = _optimizer_point(tmp_path, betas=[0.9, 0.99])
    point.check_optimizer_state(parameters, config, scheduled=False)


def _set(path, value):
    def tamper(state):
        *keys, last = path
        node = state
        for key in keys:
            node = node[key]
        node[last] = value(node[last]) if callable(value) else value

    return tamper


@pytest.mark.parametrize(
    ("tamper", "message"),
    [(_set(["state", 0, "exp_avg"], lambda t: t[:1]), r"exp_avg for parameter 0 of shape \(1, 1, 3, 3\), but the parameter\'s is \(2, 1, 3, 3\)"),
     (_set(["state", 1, "exp_avg_sq"], lambda t: t * float("nan")), "exp_avg_sq for parameter 1: NaN or infinite"),
     (_set(["param_groups", 0, "params"], [0, 1, 2]), "covers 3 parameters, but the model has 4"),
     (_set(["param_groups", 0, "weight_decay"], 0.5), r"weight_decay=0.5, but the run configures optimizer.weight_decay=0.0001"),
     (_set(["param_groups", 0, "lr"], 10.0), r"lr=10.0, but the run configures optimizer.lr=0.001"),
     (_set(["param_groups", 0, "betas"], (0.5, 0.5)), "betas="),
     (_set(["state", 0, "exp_avg_sq"], lambda t: -t - 1), "exp_avg_sq for parameter 0: negative values"),
     (_set(["state", 1, "step"], lambda t: t * 0 - 1), "step for parameter 1: negative values"),
     (_set(["state", 2, "exp_avg"], lambda t: t.to(torch.complex64)), "exp_avg for parameter 2: a torch.complex64"),
     # A stride-0 view claiming 2e9 values: refused by its shape before any value is read.
     (_set(["state", 0, "exp_avg_sq"], torch.zeros(1).as_strided((50_000, 40_000), (0, 0))),
      r"exp_avg_sq for parameter 0 of shape \(50000, 40000\)")],
)  # fmt: skip
def test_optimizer_state_that_does_not_fit_the_run_is_refused_naming_it(tmp_path, tamper, message):
    point, parameters, config = _optimizer_point(tmp_path, tamper)
    with pytest.raises(CheckpointError, match=f"{point.path}'s optimizer state .*{message}"):
        point.check_optimizer_state(parameters, config, scheduled=False)


def test_a_scheduled_learning_rate_is_the_checkpoints_to_keep(tmp_path):
    point, parameters, config = _optimizer_point(tmp_path, _set(["param_groups", 0, "lr"], 1e-5))
    point.check_optimizer_state(parameters, config, scheduled=True)


def test_a_momentum_the_schedule_cycles_is_the_checkpoints_to_keep(tmp_path):
    # OneCycleLR moves Adam's beta1 (SGD's momentum) with the learning rate: an interrupted
    # one-cycle run could never be resumed.
    cycled = _set(["param_groups", 0, "betas"], (0.8766, 0.999))
    point, parameters, config = _optimizer_point(tmp_path, cycled, betas=[0.9, 0.999])
    point.check_optimizer_state(parameters, config, scheduled=True, cycles_momentum=True)
    with pytest.raises(CheckpointError, match="betas="):  # beta2 is the run's own setting
        point.check_optimizer_state(
            parameters, {**config, "betas": [0.9, 0.98]}, scheduled=True, cycles_momentum=True
        )
    with pytest.raises(CheckpointError, match="betas="):  # a schedule that leaves it alone
        point.check_optimizer_state(parameters, config, scheduled=True)


@pytest.mark.parametrize("states", [None, [], [{}, {}], ["x"], [{"state": {}}]])
def test_a_checkpoint_without_one_optimizers_state_is_refused(states):
    point = ResumePoint(Path("/runs/a/last.ckpt"), SAVED, 1, 0, optimizer_states=states)
    with pytest.raises(CheckpointError, match="optimizer state"):
        point.check_optimizer_state([], {"_target_": "torch.optim.Adam"}, scheduled=False)


def test_other_class_weights_are_refused_naming_both():
    point = ResumePoint(Path("/runs/a/last.ckpt"), {**SAVED, "class_weights": [1.0, 1.0]}, 1, 0)
    point.check_same_class_weights([1.0, 1.0])
    point.check_same_class_weights(None)
    with pytest.raises(CheckpointError, match=r"class weights \[1.0, 1.0\] .* \[1.9437, 0.673\]"):
        point.check_same_class_weights([1.94367, 0.67302])
    ResumePoint(Path("/x.ckpt"), SAVED, 1, 0).check_same_class_weights([2.0, 0.5])  # unrecorded


@pytest.mark.parametrize(("key", "value"), [("global_step", "abc"), ("epoch", -1), ("epoch", 1.5)])
def test_a_checkpoint_with_counters_that_are_not_counts_is_refused(tmp_path, key, value):
    path = tmp_path / "odd.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"net": {}}, key: value}, path)
    with pytest.raises(CheckpointError, match=f"{path} records {key}={value!r}, not a count"):
        ResumePoint.read(path)
