"""The LightningModule: preprocessing, class-weighted BCE, diagnostic metrics and optimisers.

Everything a checkpoint needs to rebuild the model is a plain hyperparameter (numbers, strings,
lists, dicts with a ``_target_``), so checkpoints load with ``torch.load(weights_only=True)`` and
``XrayClassifier.load_from_checkpoint(path)`` needs no Hydra config. The network, optimiser and
scheduler are built only from classes in :mod:`pneumonia.model.registry`, and every other
hyperparameter is type-checked, so a checkpoint from a stranger cannot choose code to run.
"""

from __future__ import annotations

import logging
import math
import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

from pneumonia import CLASS_NAMES
from pneumonia.errors import CheckpointError
from pneumonia.metrics.diagnostic import DiagnosticMetrics
from pneumonia.model import registry

log = logging.getLogger(__name__)


def to_plain(value: Any) -> Any:
    """A DictConfig/ListConfig (resolved) as plain dicts and lists; anything else unchanged."""
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    return value


class XrayClassifier(L.LightningModule):
    """Trains a single-logit network to tell NORMAL (0) from PNEUMONIA (1).

    Args:
        net: config of the network (``_target_`` and arguments); built here so the checkpoint stores
            the recipe, not a pickled module.
        optimizer: config of the optimiser, e.g. ``{"_target_": "torch.optim.Adam", "lr": 1e-3}``.
        scheduler: optional config of a learning-rate scheduler taking ``optimizer=``.
        image_size: side of the square input; checkpoints carry it for evaluation and explanation.
        class_weights: loss weight of (NORMAL, PNEUMONIA); filled from the DataModule when fitting.
        pixel_mean: mean of the training pixels in [0, 1]; filled from the DataModule when fitting.
        pixel_std: standard deviation of the training pixels in [0, 1].
        threshold: probability at or above which a prediction is PNEUMONIA.
        channels_last: run convolutions in NHWC memory layout (about 1.4x faster on CPU with oneDNN,
            and the layout tensor cores want); results are the same.
        data_root: the data the model was fitted on; filled when fitting, so ``explain.py`` can find
            the images of a run's ``split.csv``.
        split: the settings that made the train/val/test split (root, seed, fractions, grouping,
            a digest of the file list); filled when fitting, so a resume that would change the
            split is refused.

    Raises:
        pneumonia.model.registry.UnsafeConfigError: ``net``, ``optimizer`` or ``scheduler`` names a
            class outside the registry or carries more than plain data (nothing is built then).
        TypeError, ValueError: another hyperparameter has the wrong type or range.
    """

    def __init__(
        self,
        net: Mapping[str, Any],
        optimizer: Mapping[str, Any],
        scheduler: Mapping[str, Any] | None = None,
        image_size: int = 128,
        class_weights: Sequence[float] | None = None,
        pixel_mean: float = 0.5,
        pixel_std: float = 0.25,
        threshold: float = 0.5,
        channels_last: bool = True,
        data_root: str | None = None,
        split: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        net, optimizer, scheduler, class_weights, split = map(
            to_plain, (net, optimizer, scheduler, class_weights, split)
        )
        # Everything is checked before anything is built: a checkpoint is untrusted data.
        build_net = registry.resolve("net", net)
        registry.check("optimizer", optimizer)
        registry.check("scheduler", _without_interval(scheduler))
        _check_plain_hyperparameters(
            net, image_size, class_weights, pixel_mean, pixel_std, threshold, channels_last, data_root,
            split,
        )  # fmt: skip
        # Hyperparameters are logged by the run itself, together with the metrics they produced.
        self.save_hyperparameters(logger=False)
        self.net: nn.Module = build_net()
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.net.to(memory_format=self.memory_format)
        self.train_metrics = DiagnosticMetrics(threshold)
        self.val_metrics = DiagnosticMetrics(threshold)
        self.test_metrics = DiagnosticMetrics(threshold)
        self.test_report: dict[str, Any] | None = None

    @classmethod
    def load_from_checkpoint(  # type: ignore[override]
        cls,
        checkpoint_path: str | Path,
        map_location: Any = None,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> XrayClassifier:
        """Load a checkpoint safely: ``weights_only=True`` and registered classes only.

        Raises:
            CheckpointError: naming ``checkpoint_path``, when it is not a trustworthy checkpoint of
                this class (unsafe pickle, unknown classes, wrong hyperparameters).
        """
        if kwargs.pop("weights_only", True) is not True:
            raise CheckpointError(
                f"{checkpoint_path}: checkpoints are only loaded with weights_only=True here"
            )
        if kwargs.pop("hparams_file", None) is not None:
            raise CheckpointError(f"{checkpoint_path}: hparams_file is not supported")
        try:
            return super().load_from_checkpoint(
                checkpoint_path, map_location=map_location, strict=strict, weights_only=True,
                **kwargs,
            )  # fmt: skip
        except (registry.UnsafeConfigError, TypeError, ValueError, AttributeError, KeyError) as err:
            raise CheckpointError(f"{checkpoint_path} was refused: {err}") from err
        except (pickle.UnpicklingError, EOFError, RuntimeError) as err:
            first_line = str(err).splitlines()[0] if str(err) else ""
            raise CheckpointError(
                f"{checkpoint_path} could not be loaded with weights_only=True "
                f"({type(err).__name__}: {first_line})"
            ) from err

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse weights that are not finite, whichever way the checkpoint is loaded."""
        state = checkpoint.get("state_dict")
        if not isinstance(state, Mapping):
            raise CheckpointError("the checkpoint has no state_dict of weights")
        for name, tensor in state.items():
            floating = isinstance(tensor, torch.Tensor) and tensor.is_floating_point()
            # In float32, as the network computes: a float64 1e300 is finite only as stored.
            if floating and not bool(torch.isfinite(tensor.float()).all()):
                raise CheckpointError(
                    f"the checkpoint's weights {name} hold NaN or infinite values; it comes "
                    "from a diverged run and gives no meaningful predictions"
                )

    # ----- preprocessing and inference -------------------------------------------------------
    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``(B, 1, S, S)`` pixels -> normalised float input of the network."""
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        x = (x - self.hparams.pixel_mean) / self.hparams.pixel_std
        return x.contiguous(memory_format=self.memory_format)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits ``(B,)`` of PNEUMONIA for uint8 or [0, 1] float images ``(B, 1, S, S)``."""
        return self.net(self.preprocess(images))

    def predict_proba(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        """P(PNEUMONIA) of each image, the same on every call.

        Runs in eval mode (no dropout) without gradients and restores the caller's mode afterwards.

        Args:
            images: ``(H, W)``, ``(1, H, W)`` (one image) or ``(B, 1, H, W)``, with
                ``H == W == image_size``; uint8 in 0..255 or float in [0, 1]. A numpy array or a
                tensor on any device.

        Returns:
            ``(B,)`` float tensor on the model's device (``B = 1`` for one image).

        Raises:
            ValueError: another shape, size, dtype or value range, saying what is expected.
        """
        batch = self._as_image_batch(images)
        modes = [(module, module.training) for module in self.modules()]
        self.eval()
        try:
            with torch.no_grad():
                return torch.sigmoid(self(batch).float())
        finally:
            for module, training in modes:
                module.training = training

    def _as_image_batch(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        images = torch.as_tensor(images)
        size = int(self.hparams.image_size)
        shape = tuple(images.shape)
        if images.ndim == 2:
            images = images[None, None]
        elif images.ndim == 3 and shape[0] == 1:
            images = images[None]
        if images.ndim != 4 or images.shape[1] != 1:
            raise ValueError(
                f"images of shape {shape} are not accepted; pass (H, W), (1, H, W) or (B, 1, H, W) "
                "grayscale images (convert RGB with pneumonia.data.image_io.load_grayscale)"
            )
        if tuple(images.shape[-2:]) != (size, size):
            raise ValueError(
                f"images are {shape[-2]}x{shape[-1]} but this model takes {size}x{size}; resize them "
                f"first, e.g. pneumonia.data.image_io.load_grayscale(path, {size})"
            )
        if images.dtype == torch.uint8:
            pass
        elif images.is_floating_point():
            if images.numel() and not bool(torch.isfinite(images).all()):
                raise ValueError("images contain NaN or infinite values")
            if images.numel() and (float(images.min()) < 0 or float(images.max()) > 1):
                raise ValueError(
                    f"float images must be in [0, 1], got values in [{float(images.min()):g}, "
                    f"{float(images.max()):g}]; divide 0..255 images by 255 or pass them as uint8"
                )
        else:
            raise ValueError(
                f"images of dtype {images.dtype} are not accepted; pass uint8 or float"
            )
        return images.to(self.device)

    # ----- loss -------------------------------------------------------------------------------
    def adopt_data_statistics(self, datamodule: Any) -> None:
        """Take class weights, pixel statistics, the data root and split settings from a DataModule.

        ``train.py`` calls this before fitting, in the launching process: with ``ddp_spawn`` what
        ``on_fit_start`` changes in the workers never comes back, and testing would preprocess with
        the defaults.
        """
        if getattr(datamodule, "class_weights", None) is None:
            return
        self.hparams.class_weights = [float(w) for w in datamodule.class_weights]
        self.hparams.pixel_mean = float(datamodule.pixel_mean)
        self.hparams.pixel_std = float(datamodule.pixel_std)
        if getattr(datamodule, "root", None) is not None:
            self.hparams.data_root = str(datamodule.root)
        if hasattr(datamodule, "split_settings"):
            self.hparams.split = datamodule.split_settings()

    def on_fit_start(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None:
            self.adopt_data_statistics(datamodule)
        log.info(
            "training with class weights %s (NORMAL, PNEUMONIA)",
            self.hparams.class_weights or [1.0, 1.0],
        )

    def on_train_start(self) -> None:
        if self.global_step > 0:
            return  # a resumed run logged them when it started
        # The weights in use belong next to the curves they shaped, not only in the log file.
        weights = self.hparams.class_weights or [1.0, 1.0]
        values = {
            f"class_weight/{name}": float(w) for name, w in zip(CLASS_NAMES, weights, strict=True)
        }
        for logger in self.loggers:
            logger.log_metrics(values, step=self.global_step)

    def _loss(self, logits: torch.Tensor, targets: torch.Tensor, weighted: bool) -> torch.Tensor:
        weights = None
        if weighted and self.hparams.class_weights is not None:
            weights = self._class_weight_tensor(logits.device)[targets.long()]
        return F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype), weight=weights)

    def _class_weight_tensor(self, device: torch.device) -> torch.Tensor:
        # Built once per device and weights, not per step: a host-to-device copy per step stalls GPUs.
        key = (device, tuple(self.hparams.class_weights))
        cached_key, cached = getattr(self, "_class_weight_cache", (None, None))
        if cached_key != key:
            cached = torch.tensor(key[1], device=device, dtype=torch.float32)
            self._class_weight_cache = (key, cached)
        return cached

    # ----- steps ------------------------------------------------------------------------------
    def _step(
        self, batch: tuple[torch.Tensor, torch.Tensor], metrics: DiagnosticMetrics, weighted: bool
    ):
        images, targets = batch
        logits = self(images).float()
        loss = self._loss(logits, targets, weighted=weighted)
        metrics.update(torch.sigmoid(logits.detach()), targets)
        return loss

    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> torch.Tensor:
        # The training loss is class-weighted (what is optimised); validation and test losses are
        # the plain BCE of the predictions, comparable across weighting schemes.
        loss = self._step(batch, self.train_metrics, weighted=True)
        self.log(
            "train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(batch[1])
        )
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        loss = self._step(batch, self.val_metrics, weighted=False)
        self.log(
            "val/loss", loss, on_epoch=True, prog_bar=True, batch_size=len(batch[1]), sync_dist=True
        )

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        loss = self._step(batch, self.test_metrics, weighted=False)
        self.log("test/loss", loss, on_epoch=True, batch_size=len(batch[1]), sync_dist=True)

    def on_train_epoch_end(self) -> None:
        self._log_epoch("train", self.train_metrics)

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val", self.val_metrics)

    def on_test_epoch_end(self) -> None:
        confusion, values = self._log_epoch("test", self.test_metrics, keep=True)
        self.test_report = {
            "metrics": {name: float(v) for name, v in values.items()},
            "confusion_matrix": confusion.tolist(),
            "confusion_matrix_layout": "rows: true (NORMAL, PNEUMONIA); columns: predicted (NORMAL, PNEUMONIA)",
            "images": int(confusion.sum()),
            "threshold": self.hparams.threshold,
        }
        self.test_metrics.reset()

    def _log_epoch(self, stage: str, metrics: DiagnosticMetrics, keep: bool = False):
        confusion = metrics.confusion_matrix().cpu()
        values = metrics.compute()
        headline = "balanced_accuracy"
        self.log(f"{stage}/{headline}", values[headline].float(), prog_bar=stage == "val")
        self.log_dict({f"{stage}/{k}": v.float() for k, v in values.items() if k != headline})
        if stage != "train" and not self.trainer.sanity_checking:
            self._log_confusion_figure(stage, confusion)
        if not keep:
            metrics.reset()
        return confusion, values

    def _log_confusion_figure(self, stage: str, confusion: torch.Tensor) -> None:
        tensorboards = [lg for lg in self.loggers if isinstance(lg, TensorBoardLogger)]
        if not tensorboards or not self.trainer.is_global_zero:
            return
        from pneumonia.metrics.figures import confusion_matrix_figure

        figure = confusion_matrix_figure(
            confusion.numpy(), CLASS_NAMES, f"{stage}, epoch {self.current_epoch}"
        )
        for logger in tensorboards:
            # Global steps, like every other event, so a resumed run's purge_step covers figures too.
            logger.experiment.add_figure(f"{stage}/confusion_matrix", figure, self.global_step)

    # ----- optimisation -----------------------------------------------------------------------
    def configure_optimizers(self):
        optimizer = registry.build("optimizer", self.hparams.optimizer, params=self.parameters())
        if not self.hparams.scheduler:
            return optimizer
        interval = self.hparams.scheduler.get("interval", "epoch")
        scheduler = _without_interval(self.hparams.scheduler)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {
                "scheduler": registry.build("scheduler", scheduler, optimizer=optimizer),
                "interval": interval,
            },
        }


def _without_interval(scheduler: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The scheduler node without Lightning's ``interval`` key (not a scheduler argument)."""
    if not scheduler:
        return None
    return {k: v for k, v in scheduler.items() if k != "interval"}


def _check_plain_hyperparameters(
    net,
    image_size,
    class_weights,
    pixel_mean,
    pixel_std,
    threshold,
    channels_last,
    data_root,
    split,
) -> None:
    """Type and range checks of the non-network hyperparameters (a checkpoint may hold anything)."""

    def number(name: str, value: Any, low: float, high: float = math.inf) -> None:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"{name}={value!r} must be a number")
        if not (low <= value <= high) or math.isnan(value):
            raise ValueError(f"{name}={value!r} must be within [{low}, {high}]")

    if isinstance(image_size, bool) or not isinstance(image_size, int):
        raise TypeError(f"image_size={image_size!r} must be an integer")
    number("image_size", image_size, 1, 65536)
    if isinstance(net, Mapping) and net.get("image_size", image_size) != image_size:
        raise ValueError(
            f"net.image_size={net.get('image_size')!r} differs from image_size={image_size}"
        )
    number("pixel_mean", pixel_mean, 0.0, 1.0)
    number("pixel_std", pixel_std, 1e-6, 1.0)
    number("threshold", threshold, 0.0, 1.0)
    if class_weights is not None:
        if not isinstance(class_weights, list | tuple) or len(class_weights) != len(CLASS_NAMES):
            raise ValueError(f"class_weights={class_weights!r} must be one weight per class")
        for weight in class_weights:
            number("class_weights", weight, 0.0, 1e6)
    if not isinstance(channels_last, bool):
        raise TypeError(f"channels_last={channels_last!r} must be true or false")
    if data_root is not None and not isinstance(data_root, str):
        raise TypeError(f"data_root={data_root!r} must be a string")
    if split is not None and not isinstance(split, dict):
        raise TypeError(f"split={split!r} must be a mapping")
