"""A Lightning callback that draws attribution maps of fixed validation images every N epochs."""

from __future__ import annotations

import json
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from PIL import Image

from pneumonia.errors import ConfigError
from pneumonia.explain.methods import (
    AttributionFn,
    ClassScores,
    decision_threshold,
    explain,
    find_layer,
)
from pneumonia.explain.rendering.figures import describe
from pneumonia.explain.rendering.raster import attribution_grid_image
from pneumonia.explain.settings import LAYER_METHODS, AttributionSettings
from pneumonia.files import write_atomic, written_aside
from pneumonia.metrics.evaluation import epoch_metrics_step
from pneumonia.model.modes import eval_mode

log = logging.getLogger(__name__)


class AttributionMapsCallback(Callback):
    """Guided Grad-CAM (or another method) of the same validation images, epoch after epoch.

    The images are chosen once, half of each class, in the validation set's order, so figures of
    successive epochs are directly comparable. Each time it writes one grid (X-ray, signed map,
    overlay, with label and predicted probability) to TensorBoard under ``explanations/<method>``
    and as ``<dirpath>/val_epoch<NNN>.png`` (after each validation; ``val_epoch<NNN>_batch<NNNNNN>.png``
    for one inside an epoch, as ``val_check_interval`` < 1 runs; ``test.png`` for the weights under
    test, titled with their checkpoint). It runs under ``trainer.fit`` (after validation),
    ``trainer.validate`` and ``trainer.test``; under DDP rank zero alone computes and writes.
    The training loop only computes the attribution (on a GPU it only queues it); a background
    thread copies the maps to the host, draws and writes the grid, and is finished before the next
    grid and before fit/validate/test returns. A run killed while that thread wrote the grid of the
    epoch its last checkpoint holds gets the grid redrawn from the checkpoint's weights when it
    resumes in the same folder (the callback's state in the checkpoint records which grid that is).

    Args:
        dirpath: folder for the PNGs (``None``: only TensorBoard).
        num_images: images per grid, both classes (half each when the set has enough of both).
        every_n_epochs: draw after every N-th validation epoch.
        method, target, layer, interpolate_mode, batch_size: the attribution settings, the same
            keys as ``conf/explain.yaml``'s, checked and documented by
            :class:`pneumonia.explain.settings.AttributionSettings` (``batch_size=None``: all
            ``num_images`` in one call).

    The probability shown is the module's calibrated P(PNEUMONIA)
    (``XrayClassifier.probabilities_from_logits``) and the prediction uses its stored threshold.
    """

    def __init__(
        self,
        dirpath: str | Path | None = None,
        num_images: int = 8,
        every_n_epochs: int = 1,
        method: str = "guided_gradcam",
        target: str | int = "predicted",
        layer: str | None = None,
        interpolate_mode: str = "bilinear",
        batch_size: int | None = None,
    ) -> None:
        if num_images < 1 or every_n_epochs < 1:
            raise ValueError(
                f"num_images={num_images} and every_n_epochs={every_n_epochs} must be at least 1"
            )
        self.dirpath = Path(dirpath) if dirpath else None
        self.num_images = num_images
        self.every_n_epochs = every_n_epochs
        self.settings = AttributionSettings(  # fails now on an unknown method, target or mode
            method=method,
            target=target,
            layer=layer,
            interpolate_mode=interpolate_mode,
            batch_size=batch_size,
        )
        self._attribute = None
        self._writer: ThreadPoolExecutor | None = None
        self._pending: Future | None = None
        self.images: torch.Tensor | None = None  # (N, 1, H, W) uint8
        self._device_images: torch.Tensor | None = None  # the same, on the module's device
        self.images_split = "val"
        self.labels: list[int] = []
        self.seconds: list[float] = []  # paid by the training loop, per grid
        self.background_seconds: list[float] = []  # drawing and writing, off the loop
        # The last grid drawn in a fit: {"epoch", "step" (its TensorBoard step), "global_step",
        # "folder" (dirpath, resolved)}.
        self._last_fit_grid: dict[str, Any] | None = None
        self._resumed_grid: dict[str, Any] | None = None  # the same, from a resumed checkpoint

    # ----- when ---------------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # A misnamed layer fails now, not after the first training epoch.
        if self.settings.method not in LAYER_METHODS:
            return
        try:
            find_layer(pl_module, self.settings.layer)
        except ValueError as err:
            raise ConfigError(f"callbacks.attribution_maps.layer: {err}") from err

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After the module's own on_validation_epoch_end, which fits the temperature and threshold
        # of these weights: the captions show the operating point of the weights drawn.
        if trainer.sanity_checking:
            return
        if trainer.state.fn == "fit" and (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        batch = _batches_into_epoch(trainer) if trainer.state.fn == "fit" else None
        self._draw(trainer, pl_module, "val", batch=batch)
        if trainer.state.fn == "fit":
            self._last_fit_grid = {
                "epoch": trainer.current_epoch,
                "step": epoch_metrics_step(trainer),
                "global_step": trainer.global_step,
                "folder": str(self.dirpath.resolve()) if self.dirpath else "",
            }

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._redraw_lost_grid(trainer, pl_module)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A resume with no epoch left to train never starts training (no on_train_start).
        self._redraw_lost_grid(trainer, pl_module)

    def _redraw_lost_grid(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Checkpoints are saved after this callback's on_validation_end, while its thread may still
        # be writing: a kill then loses a grid that no resumed epoch draws again.
        grid, self._resumed_grid = self._resumed_grid, None
        if grid is None or self.dirpath is None or not _drawn_before(grid, trainer):
            return  # not resumed, from a checkpoint saved after other training steps, or forged
        if grid["folder"] != str(self.dirpath.resolve()):
            return  # resumed into another run folder: nothing of this one was lost
        # Rank zero's answer for every rank: all of them must reach _draw's barrier, or none.
        # Not recorded but restored with the loops, as they were when the checkpoint was saved
        # just after the grid was drawn (a record could be forged).
        batch = _batches_into_epoch(trainer) if grid["epoch"] == trainer.current_epoch else None
        name = _grid_name("val", grid["epoch"], batch)
        drawn = trainer.strategy.broadcast((self.dirpath / name).exists())
        if drawn:
            return  # written after TensorBoard's copy (see _publish): both are there
        log.info(
            "redrawing the attribution maps of epoch %d, lost when the run stopped", grid["epoch"]
        )
        with eval_mode(pl_module):  # as after a validation: no dropout, BatchNorm frozen
            self._draw(
                trainer,
                pl_module,
                "val",
                epoch=grid["epoch"],
                step=grid["step"],
                batch=batch,
            )

    def state_dict(self) -> dict[str, Any]:
        return {"last_fit_grid": self._last_fit_grid}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        grid = state_dict.get("last_fit_grid") if isinstance(state_dict, dict) else None
        counts = ("epoch", "step", "global_step")
        if (
            isinstance(grid, dict)
            and all(_count(grid.get(key)) for key in counts)
            and isinstance(grid.get("folder"), str)  # only ever compared, never opened
        ):
            self._resumed_grid = {
                **{key: int(grid[key]) for key in counts},
                "folder": grid["folder"],
            }

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._draw(trainer, pl_module, "test")

    def _draw(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        stage: str,
        epoch: int | None = None,
        step: int | None = None,
        batch: int | None = None,
    ) -> None:
        if trainer.is_global_zero:
            self._draw_on_rank_zero(
                trainer,
                pl_module,
                stage,
                trainer.current_epoch if epoch is None else epoch,
                epoch_metrics_step(trainer) if step is None else step,
                batch,
            )
        # Other ranks wait here rather than run ahead: with ddp_spawn on gloo, a rank that reached
        # the end of fit while rank zero was still attributing aborted at exit ("terminate called
        # without an active exception") in about a third of runs.
        trainer.strategy.barrier("attribution_maps")

    # ----- what ---------------------------------------------------------------------------
    def _pick_images(self, trainer: L.Trainer, stage: str) -> None:
        dataset, self.images_split = self._dataset(trainer, stage)
        known = getattr(dataset, "labels", None)  # ours exposes labels without loading pixels
        labels = (
            [int(y) for y in known]
            if known is not None
            else [int(dataset[i][1]) for i in range(len(dataset))]
        )
        per_class = [[i for i, y in enumerate(labels) if y == c] for c in (0, 1)]
        half = self.num_images // 2
        chosen = per_class[0][:half] + per_class[1][: self.num_images - half]
        if len(chosen) < self.num_images:  # one class is short: fill from the other
            taken = set(chosen)
            chosen += [i for i in range(len(dataset)) if i not in taken][
                : self.num_images - len(chosen)
            ]
        items = [dataset[i] for i in chosen]
        self.images = torch.stack([torch.as_tensor(x) for x, _ in items])
        self.labels = [int(y) for _, y in items]

    @staticmethod
    def _dataset(trainer: L.Trainer, stage: str) -> tuple:
        """The dataset to draw from and its split: validation images whenever there are any."""
        datamodule = trainer.datamodule
        if datamodule is not None and hasattr(datamodule, "dataset"):
            try:
                return datamodule.dataset("val"), "val"
            except ValueError:  # no validation split (e.g. evaluating every image as test)
                return datamodule.dataset(stage), stage
        loaders = trainer.val_dataloaders if stage == "val" else trainer.test_dataloaders
        loader = loaders[0] if isinstance(loaders, list | tuple) else loaders
        return loader.dataset, stage

    def _draw_on_rank_zero(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        stage: str,
        epoch: int,
        step: int,
        batch: int | None,
    ) -> None:
        start = time.perf_counter()
        self._wait_for_writes()  # at most one grid in flight
        if self.images is None:
            self._pick_images(trainer, stage)
        assert self.images is not None
        if self._device_images is None or self._device_images.device != pl_module.device:
            # Once, not per epoch: a copy from pageable memory synchronises the GPU.
            self._device_images = self.images.to(pl_module.device)
        with torch.inference_mode(False):
            images = self._device_images
            pixels = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
            model = ClassScores(pl_module)
            size = self.settings.batch_size or len(pixels)
            explained = [
                explain(model, batch, self.attribute, self.settings.target)
                for batch in pixels.split(size)
            ]
            maps = torch.cat([m for m, _, _ in explained])
            probabilities = torch.cat([p for _, p, _ in explained])
        threshold = getattr(pl_module, "decision_threshold", None)
        # Device tensors: the background thread copies them to the host, so on a GPU the training
        # loop only queues the attribution and never waits for it (stream order keeps the maps
        # those of this epoch's weights).
        job = {
            "images": pixels[:, 0].detach(),
            "maps": maps[:, 0].detach(),
            "probabilities": probabilities.detach(),
            "threshold": threshold.detach().clone()
            if isinstance(threshold, torch.Tensor)
            else decision_threshold(pl_module),
            "stage": stage,
            "epoch": epoch,
            "batch": batch,  # training batches into the epoch; None after a whole epoch
            # The test runs on the best checkpoint's weights, not on the last epoch's.
            "weights": Path(trainer.ckpt_path).name if trainer.ckpt_path else "the final weights",
            "step": step,  # that of the epoch's metrics, which a resume's purge keeps
            "tensorboards": [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)],
        }
        # Drawing and PNG encoding go to a background thread: the training loop only pays for the
        # attribution itself (on a GPU the writing took longer than the attribution).
        if self._writer is None:
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="attribution-maps")
        self._pending = self._writer.submit(self._publish, job)
        self.seconds.append(time.perf_counter() - start)
        when = f"epoch {epoch}" if stage == "val" else f"the {stage} run"
        log.info("attribution maps for %s took %.2f s", when, self.seconds[-1])

    def _publish(self, job: dict) -> None:
        start = time.perf_counter()
        job["images"] = job["images"].float().cpu().numpy()
        job["maps"] = job["maps"].float().cpu().numpy()
        job["probabilities"] = job["probabilities"].cpu().tolist()
        job["threshold"] = float(job["threshold"])
        when = (
            f"epoch {job['epoch']}" + ("" if job["batch"] is None else f", batch {job['batch']}")
            if job["stage"] == "val"
            else f"tested weights: {job['weights']}"
        )
        title = (
            f"{self.settings.method} ({self.settings.target} class) of {self.images_split} images, "
            f"{job['stage']}, {when}"
        )
        captions = [
            describe(y, p, job["threshold"]).replace(", ", "\n")
            for y, p in zip(self.labels, job["probabilities"], strict=True)
        ]
        grid = attribution_grid_image(job["images"], job["maps"], captions, title)
        # TensorBoard's copy first, flushed, and the PNG last: a PNG on disk means both were
        # written, and a resume redraws a missing one with its TensorBoard image (a kill between
        # the two then shows that image twice, never loses it).
        for logger in job["tensorboards"]:
            tag = f"explanations/{self.settings.method}/{job['stage']}"
            logger.experiment.add_image(tag, grid, job["step"], dataformats="HWC")
            logger.experiment.flush()
        if self.dirpath is not None:
            self.dirpath.mkdir(parents=True, exist_ok=True)
            # Whole or absent: a kill while the grid is written leaves no empty PNG behind.
            name = _grid_name(job["stage"], job["epoch"], job["batch"])
            with written_aside(self.dirpath / name) as partial:
                Image.fromarray(grid).save(partial, format="PNG")
            self.background_seconds.append(time.perf_counter() - start)
            # Lets benchmarks set the callback's cost against an epoch's.
            timings = {"seconds": self.seconds, "background_seconds": self.background_seconds}
            write_atomic(self.dirpath / "timings.json", json.dumps(timings))

    def _wait_for_writes(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()  # re-raises a failure of the background write here

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Finish writing before fit/validate/test returns, so every file exists afterwards."""
        try:
            self._wait_for_writes()
        finally:
            if self._writer is not None:
                self._writer.shutdown()
                self._writer = None

    def __getstate__(self) -> dict:
        # ddp_spawn pickles callbacks; threads and closures do not pickle and are rebuilt lazily.
        state = self.__dict__.copy()
        state.update(_writer=None, _pending=None, _attribute=None, _device_images=None)
        return state

    @property
    def method(self) -> str:
        return self.settings.method

    @property
    def target(self) -> str | int:
        return self.settings.target

    @property
    def attribute(self) -> AttributionFn:
        """The attribution function of :attr:`settings`, built on first use (and after unpickling)."""
        if self._attribute is None:
            self._attribute = self.settings.attribution_fn()
        return self._attribute


def _grid_name(stage: str, epoch: int, batch: int | None = None) -> str:
    """``val_epoch<NNN>.png`` after an epoch, ``val_epoch<NNN>_batch<NNNNNN>.png`` after a
    validation ``batch`` training batches into one, ``test.png``.

    Batches, not optimiser steps: with ``accumulate_grad_batches`` two validations can fall
    between the same two steps.
    """
    if stage != "val":
        return "test.png"
    return f"val_epoch{epoch:03d}" + ("" if batch is None else f"_batch{batch:06d}") + ".png"


def _batches_into_epoch(trainer: L.Trainer) -> int | None:
    """The training batches of this epoch done before the fit's validation running now; None for
    the validation that ends the epoch (the test Lightning's training epoch loop makes before it
    ends one), as opposed to one that ``val_check_interval`` or an early stop started inside it."""
    progress = trainer.fit_loop.epoch_loop.batch_progress
    done = progress.current.ready
    return None if progress.is_last_batch or done == trainer.num_training_batches else done


def _drawn_before(grid: dict[str, Any], trainer: L.Trainer) -> bool:
    """Whether a recorded grid is the one drawn just before the checkpoint being resumed was saved:
    drawn at the checkpoint's global step G, logged at its metrics' step G - 1
    (:func:`epoch_metrics_step`), in the last completed epoch (or the current one, for a checkpoint
    saved within an epoch)."""
    return (
        grid["global_step"] == trainer.global_step
        and grid["step"] == trainer.global_step - 1
        and grid["epoch"] in (trainer.current_epoch - 1, trainer.current_epoch)
    )


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
