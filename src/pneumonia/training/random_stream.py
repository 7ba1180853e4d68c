"""The random stream a resumed run continues with, so a resume trains what the run would have.

``seed_everything`` makes a run repeatable from its start, but a resume starts a new process:
shuffling, augmentation and dropout after it would draw from a fresh stream, and a resumed run's
figures would differ from the uninterrupted run's with the same seed. Lightning's checkpoints do
not hold the generators' states, so :class:`RandomStreamCheckpoint` writes them into every
checkpoint (as a callback state, tensors and plain numbers only, so a checkpoint stays loadable with
``weights_only=True``) and puts them back when training resumes.

What a resume repeats exactly, and what it cannot, depends on where in its epoch the checkpoint
was written (see :class:`RandomStreamCheckpoint`); nothing draws from the generators between a
save and the next epoch's first batch, so the state saved is the one the next epoch starts from.
"""

from __future__ import annotations

import logging
import math
import random
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader

from pneumonia import is_whole_number
from pneumonia.data.device_batches import DeviceBatches
from pneumonia.errors import CheckpointError

log = logging.getLogger(__name__)

_TORCH_STATE_BYTES = len(torch.get_rng_state())
_CUDA_STATE_BYTES = 16  # Philox: a 64-bit seed and a 64-bit offset
_NUMPY_KEYS = 624  # MT19937's state words
_MAX_PROCESSES = 1_000_000
_NOT_OURS = (
    "it was not written by train.py. Resume from a checkpoints/last.ckpt that train.py wrote"
)

# When in its epoch a checkpoint was written: after the epoch ended (Lightning saves there when
# every epoch validates once), after its training batches but before it ended (validation every
# n > 1 epochs, or several times per epoch), or within its batches (a mid-epoch validation, or an
# epoch cut short by max_steps).
EPOCH_END, AFTER_TRAINING, MID_EPOCH = "epoch_end", "after_training", "mid_epoch"
SAVE_MOMENTS = (EPOCH_END, AFTER_TRAINING, MID_EPOCH)
_LOADERS = {
    "device": "on the device",
    "in-process": "in the training process",
    "workers": "by worker processes",
}


def capture() -> dict[str, Any]:
    """The states of the generators a training step draws from: PyTorch's CPU generator, every
    initialised CUDA device's, NumPy's and Python's global ones."""
    numpy_state = np.random.get_state(legacy=True)
    python_version, python_words, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "torch.cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "numpy": {
            "keys": torch.from_numpy(numpy_state[1].astype(np.int64)),
            "position": int(numpy_state[2]),
            "has_gauss": int(numpy_state[3]),
            "cached_gaussian": float(numpy_state[4]),
        },
        "python": {
            "version": python_version,
            "words": torch.tensor(python_words, dtype=torch.int64),
            "gauss_next": gauss_next,
        },
    }


def check(state: Any, where: str) -> None:
    """Refuse a recorded stream :func:`restore` could not put back.

    Raises:
        CheckpointError: naming ``where`` (the checkpoint) and the entry that is wrong.
    """
    problem = _problem(state)
    if problem is not None:
        raise CheckpointError(
            f"{where} records a random stream that cannot be restored ({problem}); {_NOT_OURS}"
        )


def check_recorded_stream(checkpoint: dict[str, Any], where: str) -> None:
    """Refuse a checkpoint whose recorded stream could not be put back (none recorded passes:
    checkpoints from before the record resume from a fresh stream).

    Raises:
        CheckpointError: naming ``where`` and the entry that is wrong.
    """
    callbacks = checkpoint.get("callbacks", {})
    if not (isinstance(callbacks, dict) and all(isinstance(v, dict) for v in callbacks.values())):
        # Lightning hands each callback its entry; anything else fails inside the fit.
        raise CheckpointError(
            f"{where} records callback states that are not a mapping of mappings; {_NOT_OURS}"
        )
    if RandomStreamCheckpoint.__qualname__ in callbacks:
        check(callbacks[RandomStreamCheckpoint.__qualname__], where)


def restore(state: dict[str, Any]) -> None:
    """Put back what :func:`capture` recorded (CUDA devices beyond those present are skipped)."""
    torch.set_rng_state(state["torch"])
    cuda_states = state["torch.cuda"]
    if cuda_states and torch.cuda.is_available():
        for device, cuda_state in enumerate(cuda_states[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, device)
    np.random.set_state(_numpy_state(state["numpy"]))
    random.setstate(_python_state(state["python"]))


def _numpy_state(recorded: dict[str, Any]) -> tuple:
    keys = recorded["keys"].numpy().astype(np.uint32)
    return (
        "MT19937",
        keys,
        recorded["position"],
        recorded["has_gauss"],
        recorded["cached_gaussian"],
    )


def _python_state(recorded: dict[str, Any]) -> tuple:
    return (recorded["version"], tuple(recorded["words"].tolist()), recorded["gauss_next"])


def _problem(state: Any) -> str | None:
    """What is wrong with a recorded state, or None. Each stream is put into a scratch generator,
    so whatever the generators themselves refuse is found here, before training."""
    if not isinstance(state, dict) or not isinstance(state.get("streams"), dict):
        return "no 'streams'"
    world_size = state.get("world_size")
    if not (is_whole_number(world_size) and 1 <= world_size <= _MAX_PROCESSES):
        return f"world_size {world_size!r} is not a number of processes"
    if state.get("saved", EPOCH_END) not in SAVE_MOMENTS:
        return f"saved={state.get('saved')!r} is none of {', '.join(SAVE_MOMENTS)}"
    if not isinstance(state.get("loader", ""), str):
        return f"loader={state.get('loader')!r} is not a name"
    streams = state["streams"]
    tensors = {
        "torch": streams.get("torch"),
        **{f"torch.cuda[{i}]": s for i, s in enumerate(_as_list(streams.get("torch.cuda")))},
        "numpy keys": _entry(streams, "numpy", "keys"),
        "python words": _entry(streams, "python", "words"),
    }
    for name, tensor in tensors.items():
        if not _is_plain_vector(tensor):
            return f"{name!r} is not a dense, contiguous 1-d CPU tensor"
    if not isinstance(streams.get("torch.cuda"), list):
        return "'torch.cuda' is not a list"
    torch_state = streams["torch"]
    if torch_state.dtype != torch.uint8 or torch_state.numel() != _TORCH_STATE_BYTES:
        return f"'torch' is not a {_TORCH_STATE_BYTES}-byte uint8 tensor"
    try:
        torch.Generator().set_state(torch_state)
    except (RuntimeError, TypeError, ValueError) as error:
        return f"'torch' is not a generator state ({error})"
    for index, cuda_state in enumerate(streams["torch.cuda"]):
        if cuda_state.dtype != torch.uint8 or cuda_state.numel() != _CUDA_STATE_BYTES:
            return f"'torch.cuda[{index}]' is not a {_CUDA_STATE_BYTES}-byte uint8 tensor"
        offset = int.from_bytes(cuda_state[8:].numpy().tobytes(), "little", signed=True)
        if offset < 0 or offset % 4:
            return f"'torch.cuda[{index}]' has offset {offset}, not a multiple of 4"
    numpy_state, python_state = streams["numpy"], streams["python"]
    keys = numpy_state["keys"]
    if keys.dtype != torch.int64 or keys.numel() != _NUMPY_KEYS:
        return f"'numpy' keys are not {_NUMPY_KEYS} int64 numbers"
    if keys.min() < 0 or keys.max() >= 2**32:
        return "'numpy' keys are not 32-bit words"
    position, has_gauss = numpy_state.get("position"), numpy_state.get("has_gauss")
    if not (_is_int(position) and 0 <= position <= _NUMPY_KEYS):
        return f"'numpy' position {position!r} is not in 0..{_NUMPY_KEYS}"
    gaussian = numpy_state.get("cached_gaussian")
    if has_gauss not in (0, 1) or not _is_int(has_gauss) or not _is_finite_float(gaussian):
        return "'numpy' has no valid Gaussian cache (has_gauss 0 or 1, a finite cached_gaussian)"
    gauss_next = python_state.get("gauss_next")
    if python_state["words"].dtype != torch.int64 or not (
        gauss_next is None or _is_finite_float(gauss_next)
    ):
        return "'python' words are not int64, or gauss_next is neither None nor a finite float"
    try:
        np.random.RandomState().set_state(_numpy_state(numpy_state))
        random.Random().setstate(_python_state(python_state))
    except (TypeError, ValueError, OverflowError, KeyError) as error:
        return f"'numpy' or 'python' is not a generator state ({error})"
    return None


def _entry(streams: dict[str, Any], stream: str, key: str) -> Any:
    """``streams[stream][key]``, or None where either is missing or not a mapping."""
    recorded = streams.get(stream)
    return recorded.get(key) if isinstance(recorded, dict) else None


def _as_list(value: Any) -> list:
    return value if isinstance(value, list) else []


def _is_plain_vector(value: Any) -> bool:
    return (
        isinstance(value, torch.Tensor)
        and value.device.type == "cpu"
        and value.layout == torch.strided
        and value.dim() == 1
        and value.is_contiguous()
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite_float(value: Any) -> bool:
    return isinstance(value, float) and math.isfinite(value)


def loader_kind(loader: Any) -> str:
    """How a training loader draws from the global stream: ``device`` batches draw one
    permutation per epoch, a DataLoader ``in-process`` a worker seed and a permutation, one with
    ``workers`` the permutation only (its worker seed comes from its own generator)."""
    if isinstance(loader, DeviceBatches):
        return "device"
    if isinstance(loader, DataLoader):
        return "workers" if loader.num_workers > 0 else "in-process"
    return type(loader).__name__


class RandomStreamCheckpoint(Callback):
    """Records the generators' states in every checkpoint and restores them when a fit resumes.

    A checkpoint written when its epoch ended is restored as it is read: Lightning makes the first
    resumed epoch's loader iterator before any later hook (the sanity check in between runs in an
    isolated stream). One written after the epoch's batches but before it ended (validation every
    n > 1 epochs) is restored when Lightning has finished that old epoch, which it re-enters with
    an iterator of its own. One written within the batches cannot be repeated:
    Lightning restarts that epoch's loader, which draws a new order, so the resume says so.

    Streams are per process: under DDP each rank draws its own, and the checkpoint (rank 0's)
    holds one, so a resume with several processes, or of a run trained with several, continues
    from fresh streams and says so.
    """

    def __init__(self) -> None:
        self._trainer: L.Trainer | None = None
        self._fitting = False
        self._epoch_open = False
        self._recorded: dict[str, Any] | None = None  # the resumed checkpoint's
        self._restore_at_epoch_end = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer
        self._fitting = stage == "fit"
        self._recorded = None
        self._restore_at_epoch_end = False

    def state_dict(self) -> dict[str, Any]:
        trainer = self._trainer
        if trainer is None:  # never set up: no fit to place the save in
            return {"world_size": 1, "saved": EPOCH_END, "loader": "", "streams": capture()}
        return {
            "world_size": trainer.world_size,
            "saved": self._save_moment(trainer),
            "loader": loader_kind(trainer.train_dataloader),
            "streams": capture(),
        }

    def _save_moment(self, trainer: L.Trainer) -> str:
        ran_all_batches = bool(trainer.fit_loop.epoch_loop.batch_progress.is_last_batch)
        if not ran_all_batches:
            return MID_EPOCH
        return AFTER_TRAINING if self._epoch_open else EPOCH_END

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        check(state_dict, "the checkpoint")
        self._recorded = state_dict
        if not self._fitting:
            return
        processes = self._trainer.world_size if self._trainer is not None else 1
        if state_dict["world_size"] != 1 or processes != 1:
            self._say(
                "the random stream continues afresh: the checkpoint holds one process's, and this "
                f"run trains with {processes} (it was trained with "
                f"{state_dict['world_size']})"
            )
        elif state_dict.get("saved", EPOCH_END) == AFTER_TRAINING:
            self._restore_at_epoch_end = True
        else:
            restore(state_dict["streams"])

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.ckpt_path is None:
            return
        recorded = self._recorded
        if recorded is None:
            self._say(
                f"{trainer.ckpt_path} holds no random stream (written before train.py recorded "
                "it): shuffling, augmentation and dropout continue from a fresh one"
            )
            return
        if recorded.get("saved") == MID_EPOCH:
            self._say(
                f"{trainer.ckpt_path} was written within an epoch, at step {trainer.global_step} "
                "(a validation inside the epoch, or max_steps): Lightning does not resume a loader "
                "within an epoch, so the rest of that epoch is not what an uninterrupted run "
                "trains, and the run will differ from one"
            )
        loader = loader_kind(trainer.train_dataloader)
        if recorded.get("loader") and recorded["loader"] != loader:
            self._say(
                f"{trainer.ckpt_path} was trained on batches loaded "
                f"{_LOADERS.get(recorded['loader'], recorded['loader'])}, and this run loads them "
                f"{_LOADERS.get(loader, loader)} (data.num_workers, data.batches_on_device): they "
                "draw from the random stream differently, so the run will differ from an "
                "uninterrupted one"
            )

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_open = True
        self._restore_pending()  # had the old epoch's end not been re-entered

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Before any checkpoint callback's own on_train_epoch_end: Lightning runs those last.
        self._epoch_open = False
        # The re-entered old epoch ends here; the next one may make its loader iterator before
        # its on_train_epoch_start (reload_dataloaders_every_n_epochs).
        self._restore_pending()

    def _restore_pending(self) -> None:
        if self._restore_at_epoch_end:
            self._restore_at_epoch_end = False
            restore(self._recorded["streams"])

    def _say(self, message: str) -> None:
        if self._trainer is None or self._trainer.is_global_zero:
            log.warning(message)
