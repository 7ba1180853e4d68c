"""Checkpoints are untrusted data: crafted ones are refused, naming the file, and nothing runs.

Each attack is a checkpoint that loads under ``torch.load(weights_only=True)`` but whose
hyperparameters try to make the loader call something: a function, a class reached through
another module's attributes, a nested node, a Hydra flag. Each would create ``pwned`` in the test's
folder if anything ran. Every entry point that reads checkpoints is tried.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from pneumonia.errors import CheckpointError
from pneumonia.model.classifier import XrayClassifier
from pneumonia.training.checkpoints import read_checkpoint
from pneumonia.training.status import LOCK_FILE

NET = {"_target_": "pneumonia.model.study_cnn.StudyCNN", "image_size": 32, "channels": [4, 8, 8], "hidden_features": 8}  # fmt: skip
ADAM = {"_target_": "torch.optim.Adam", "lr": 1e-3}
MARKER = "pwned"


def _attacks(marker: Path) -> dict[str, dict]:
    """Hyperparameter changes, each of which would write ``marker`` if it were honoured."""
    touch = {"_target_": "os.system", "command": f"touch {marker}"}
    save = {"_target_": "torch.save", "obj": 1, "f": str(marker)}
    return {
        "function": {"net": touch},
        "allowed prefix, attribute path": {"net": {**touch, "_target_": "pneumonia.model.study_cnn.torch.os.system"}},
        "torch.nn prefix, attribute path": {"net": {**touch, "_target_": "torch.nn.modules.module.os.system"}},
        "torchvision prefix": {"net": {**touch, "_target_": "torchvision.models.resnet.os.system"}},
        "function under torch": {"net": save},
        "nested node": {"net": {**NET, "channels": [4, 8, touch]}},
        "nested node in a dict": {"net": {**NET, "extra": {"inner": save}}},
        "_args_ flag": {"net": {"_target_": "builtins.open", "_args_": [str(marker), "w"]}},
        "_partial_ flag": {"net": {**NET, "_partial_": True}},
        "_recursive_ flag": {"net": {**NET, "_recursive_": False, "x": touch}},
        "optimizer function": {"optimizer": {"_target_": "torch.save", "obj": 1, "f": str(marker)}},
        "optimizer attribute path": {"optimizer": {**touch, "_target_": "torch.optim.adam.torch.os.system"}},
        "optimizer base class path": {"optimizer": {"_target_": "torch.optim.Optimizer.__init__"}},
        "scheduler function": {"scheduler": {**save, "interval": "epoch"}},
        "scheduler taking a callable": {"scheduler": {"_target_": "torch.optim.lr_scheduler.LambdaLR", "lr_lambda": "os.system"}},
        "Lightning instantiator": {"_instantiator": "os.system"},
        "tensor argument": {"net": {**NET, "image_size": torch.tensor(32)}},
        "non-string key": {"net": {**NET, 1: "x"}},
        "class weights of another type": {"class_weights": "os.system"},
        "threshold out of range": {"threshold": 7.0},
        "interpolation string": {"data_root": None, "net": {**NET, "image_size": "${oc.env:HOME}"}},
        "network size differs from the model's": {"net": {**NET, "image_size": 64}},
        "hyperparameters not a mapping": {"hyper_parameters": ["os.system"]},
    }  # fmt: skip


@pytest.fixture(scope="module")
def honest_checkpoint(tmp_path_factory) -> dict:
    module = XrayClassifier(net=NET, optimizer=ADAM, image_size=32)
    loader = DataLoader(
        TensorDataset(torch.randint(0, 256, (8, 1, 32, 32), dtype=torch.uint8), torch.ones(8)),
        batch_size=4,
    )
    trainer = L.Trainer(
        max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(module, train_dataloaders=loader)
    path = tmp_path_factory.mktemp("honest") / "model.ckpt"
    trainer.save_checkpoint(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def _craft(honest: dict, folder: Path, name: str) -> tuple[Path, Path]:
    marker = folder / MARKER
    checkpoint = copy.deepcopy(honest)
    attack = _attacks(marker)[name]
    if "hyper_parameters" in attack:
        checkpoint.update(attack)
    else:
        checkpoint["hyper_parameters"].update(attack)
    path = folder / "crafted.ckpt"
    torch.save(checkpoint, path)
    torch.load(path, weights_only=True)  # the attack is a checkpoint that loads safely
    return path, marker


def _files(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("attack", list(_attacks(Path(MARKER))))
def test_loading_a_crafted_checkpoint_runs_nothing(honest_checkpoint, tmp_path, attack):
    path, marker = _craft(honest_checkpoint, tmp_path, attack)
    before = _files(tmp_path)
    with pytest.raises(CheckpointError, match=str(path)):
        XrayClassifier.load_from_checkpoint(path, map_location="cpu")
    assert not marker.exists()
    assert _files(tmp_path) == before


ENTRY_ATTACKS = ["function", "allowed prefix, attribute path", "nested node", "optimizer function"]


def _evaluate(cfg) -> None:
    from pneumonia.training.run import run

    run(cfg)


def _explain(cfg) -> None:
    from pneumonia.explain.run import explain_checkpoint

    explain_checkpoint(cfg)


# Each entry point: its config (with the crafted checkpoint's path) and the task it runs.
ENTRY_POINTS = {
    "evaluate": ("eval", "data.root={small_root}", _evaluate),
    "explain": ("explain", "images={tmp_path}", _explain),
}


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
@pytest.mark.parametrize("attack", ENTRY_ATTACKS)
def test_evaluating_or_explaining_a_crafted_checkpoint_runs_nothing(
    honest_checkpoint, compose_config, small_root, tmp_path, attack, entry
):
    config_name, data_override, task = ENTRY_POINTS[entry]
    path, marker = _craft(honest_checkpoint, tmp_path, attack)
    override = data_override.format(small_root=small_root, tmp_path=tmp_path)
    cfg = compose_config(f"ckpt_path={path}", override, config_name=config_name)
    with pytest.raises(CheckpointError, match=str(path)):
        task(cfg)
    assert not marker.exists()
    output_dir = Path(cfg.paths.output_dir)
    # Only the run's own record that it failed, naming the checkpoint it refused (and its lock).
    assert _files(output_dir) <= {output_dir / "run_status.json", output_dir / LOCK_FILE}
    if entry == "evaluate":
        status = json.loads((output_dir / "run_status.json").read_text())
        assert status["status"] == "failed" and status["error"].startswith("CheckpointError")


def test_only_weights_only_loading_is_offered(honest_checkpoint, tmp_path):
    path = tmp_path / "model.ckpt"
    torch.save(honest_checkpoint, path)
    with pytest.raises(CheckpointError, match="only loaded with weights_only=True"):
        XrayClassifier.load_from_checkpoint(path, weights_only=False)
    loaded = XrayClassifier.load_from_checkpoint(path)
    for name, tensor in honest_checkpoint["state_dict"].items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, rtol=0, atol=0)


def test_a_pickled_payload_is_refused_naming_the_file(honest_checkpoint, tmp_path):
    marker = tmp_path / MARKER

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    checkpoint = copy.deepcopy(honest_checkpoint)
    checkpoint["hyper_parameters"]["data_root"] = Payload()
    path = tmp_path / "pickled.ckpt"
    torch.save(checkpoint, path)
    with pytest.raises(CheckpointError, match=f"{path} could not be loaded with weights_only=True"):
        XrayClassifier.load_from_checkpoint(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("value", "dtype"),
    [(float("nan"), torch.float32), (float("inf"), torch.float32), (1e300, torch.float64)],
)
def test_weights_that_are_not_finite_are_refused(honest_checkpoint, tmp_path, value, dtype):
    checkpoint = copy.deepcopy(honest_checkpoint)
    name = next(key for key in checkpoint["state_dict"] if key.startswith("net."))
    checkpoint["state_dict"][name] = checkpoint["state_dict"][name].to(dtype)
    checkpoint["state_dict"][name].view(-1)[0] = value  # 1e300 is finite only in float64
    path = tmp_path / "diverged.ckpt"
    torch.save(checkpoint, path)
    with pytest.raises(CheckpointError, match=f"{path}.*weights {name} hold NaN or infinite"):
        XrayClassifier.load_from_checkpoint(path)


def _nested(depth: int) -> list:
    """One list reused at every level: a few hundred bytes expanding to 2**depth leaves."""
    value: list = [0.9]
    for _ in range(depth):
        value = [value, value]
    return value


def _weight_name(checkpoint: dict) -> str:
    return next(k for k in checkpoint["state_dict"] if k.startswith("net.") and "weight" in k)


@pytest.mark.parametrize(
    ("craft", "message"),
    [(lambda c: c["state_dict"].update(zz=torch.zeros(1).as_strided((50_000, 40_000), (0, 0))),
      r"do not belong to this network: unknown \['zz'\]"),
     (lambda c: c["state_dict"].pop(_weight_name(c)), "do not belong to this network: unknown \\[\\], missing"),
     (lambda c: c["state_dict"].update({_weight_name(c): torch.zeros(1).as_strided((9, 9), (0, 0))}),
      r"has shape \(9, 9\), but this network's has"),
     (lambda c: c["state_dict"].update({_weight_name(c): torch.complex(
         torch.full(c["state_dict"][_weight_name(c)].shape, float("nan")),
         torch.zeros(c["state_dict"][_weight_name(c)].shape))}), "is torch.complex64"),
     (lambda c: c["hyper_parameters"]["optimizer"].update(betas=_nested(40)), "nests deeper than 32"),
     (lambda c: c["hyper_parameters"].update(split={"bomb": _nested(22)}), "more than 100,000 values")],
)  # fmt: skip
def test_a_checkpoint_that_would_expand_or_slip_past_the_checks_is_refused_quickly(
    honest_checkpoint, tmp_path, craft, message
):
    checkpoint = copy.deepcopy(honest_checkpoint)
    craft(checkpoint)
    path = tmp_path / "crafted.ckpt"
    torch.save(checkpoint, path)
    assert path.stat().st_size < 10 * 2**20
    with pytest.raises(CheckpointError, match=f"{path}.*{message}"):
        XrayClassifier.load_from_checkpoint(path)
    if "nests" in message or "values" in message:  # what resuming and evaluating read first
        with pytest.raises(CheckpointError, match=f"{path} was refused: .*{message}"):
            read_checkpoint(path)
