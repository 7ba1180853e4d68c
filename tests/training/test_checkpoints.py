import pytest
import torch

from pneumonia.training.checkpoints import (
    CheckpointError,
    best_checkpoint,
    read_hyperparameters,
    resolve_checkpoint,
)


def test_resolution_of_last_run_folder_and_file(tmp_path):
    assert resolve_checkpoint(None, tmp_path) is None
    with pytest.raises(CheckpointError, match=r"ckpt_path=last.*run_dir=<that run's folder>"):
        resolve_checkpoint("last", tmp_path)
    last = tmp_path / "checkpoints" / "last.ckpt"
    last.parent.mkdir()
    last.write_bytes(b"")
    assert resolve_checkpoint("last", tmp_path) == last
    assert resolve_checkpoint(tmp_path, "/elsewhere") == last
    assert resolve_checkpoint(last, "/elsewhere") == last
    with pytest.raises(CheckpointError, match="missing.ckpt does not exist"):
        resolve_checkpoint(tmp_path / "missing.ckpt", tmp_path)


def test_a_folder_without_checkpoints_is_named_for_what_it_is(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    with pytest.raises(CheckpointError, match=r"images holds no checkpoints/ folder: it is not a"):
        resolve_checkpoint(images, tmp_path, prefer_best=True)
    evaluated = tmp_path / "run" / "checkpoints" / "e3.ckpt"
    evaluated.parent.mkdir(parents=True)
    evaluated.write_bytes(b"")
    evaluation = tmp_path / "evaluation"
    evaluation.mkdir()
    (evaluation / "test_metrics.json").write_text(f'{{"checkpoint": "{evaluated}"}}')
    with pytest.raises(CheckpointError, match=rf"evaluation or explanation of {evaluated}; pass"):
        resolve_checkpoint(evaluation, tmp_path, prefer_best=True)
    # A run's own folder copied without its checkpoints records one inside itself: not named.
    copied = tmp_path / "copied"
    copied.mkdir()
    (copied / "test_metrics.json").write_text(f'{{"checkpoint": "{copied}/checkpoints/e.ckpt"}}')
    with pytest.raises(CheckpointError, match=r"copied holds no checkpoints/ folder: it is not a"):
        resolve_checkpoint(copied, tmp_path, prefer_best=True)
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "multirun.yaml").write_text("{}")
    with pytest.raises(CheckpointError, match=r"a sweep's folder; pass one of its job folders"):
        resolve_checkpoint(sweep, tmp_path, prefer_best=True)


def test_foreign_files_are_refused_with_the_reason(tmp_path):
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="garbage.ckpt is not a checkpoint that loads safely"):
        read_hyperparameters(garbage)
    # Text that torch's unpickler reads as opcodes: it raised a bare KeyError.
    text = tmp_path / "notes.ckpt"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match=r"notes.ckpt is not a checkpoint .*KeyError"):
        read_hyperparameters(text)

    class Payload:
        def __reduce__(self):
            return (print, ("ran",))

    crafted = tmp_path / "crafted.ckpt"
    torch.save({"state_dict": {}, "payload": Payload()}, crafted)
    with pytest.raises(
        CheckpointError, match="it needs unsafe unpickling: Unsupported global"
    ) as err:
        read_hyperparameters(crafted)
    assert "weights_only` set to `False`" not in str(err.value)  # no advice to run the payload
    other = tmp_path / "other.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"lr": 0.1}}, other)
    with pytest.raises(
        CheckpointError, match="other.ckpt is not a pneumonia XrayClassifier checkpoint"
    ):
        read_hyperparameters(other)
    pickled = tmp_path / "pickled.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"net": torch.nn.Linear(1, 1)}}, pickled)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        read_hyperparameters(pickled)


MINIMAL = {"state_dict": {}, "hyper_parameters": {"net": {}}}


def test_a_run_folder_means_its_recorded_best_checkpoint_when_asked(tmp_path, caplog):
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    best = folder / "epoch03-bacc0.9700.ckpt"
    torch.save({"state_dict": {}}, best)
    state = {"best_model_path": "/moved/away/epoch03-bacc0.9700.ckpt", "dirpath": "/moved/away"}
    torch.save({"callbacks": {"RunCheckpoint{'monitor': 'val/balanced_accuracy'}": state}, **MINIMAL}, folder / "last.ckpt")  # fmt: skip
    torch.save({"state_dict": {}}, folder / "epoch09-bacc0.9100.ckpt")  # a later, worse one
    assert best_checkpoint(tmp_path / "run") == best
    assert resolve_checkpoint(tmp_path / "run", tmp_path, prefer_best=True) == best
    assert resolve_checkpoint(tmp_path / "run", tmp_path) == folder / "last.ckpt"  # resuming
    assert resolve_checkpoint(folder, tmp_path, prefer_best=True) == best  # the checkpoints folder
    best.unlink()
    with caplog.at_level("WARNING"):
        assert resolve_checkpoint(tmp_path / "run", tmp_path, prefer_best=True) == folder / "last.ckpt"  # fmt: skip
    assert "records its best checkpoint as epoch03-bacc0.9700.ckpt, which is not a checkpoint in" in caplog.text  # fmt: skip
    # A recorded best that is some other file beside the checkpoints is not taken for one.
    (folder / "notes.txt").write_text("a user's notes")
    state["best_model_path"] = "/elsewhere/notes.txt"
    torch.save({"callbacks": {"RunCheckpoint{'monitor': 'val/balanced_accuracy'}": state}, **MINIMAL}, folder / "last.ckpt")  # fmt: skip
    assert best_checkpoint(tmp_path / "run") is None


@pytest.mark.parametrize("damage", ["truncated", "callbacks"])
def test_a_damaged_last_checkpoint_in_a_run_folder_is_named(tmp_path, damage):
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    last = folder / "last.ckpt"
    torch.save({"callbacks": {"x": {"best_model_path": "a.ckpt", "dirpath": "d"}}, **MINIMAL}, last)
    if damage == "truncated":
        last.write_bytes(last.read_bytes()[:200])
        with pytest.raises(CheckpointError, match=f"{last} is not a checkpoint that loads safely"):
            resolve_checkpoint(tmp_path / "run", tmp_path, prefer_best=True)
    else:
        torch.save({"callbacks": ["x"], **MINIMAL}, last)
        assert best_checkpoint(tmp_path / "run") is None
