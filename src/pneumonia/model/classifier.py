"""The LightningModule: preprocessing, class-weighted BCE, diagnostic metrics and optimisers.

Everything a checkpoint needs to rebuild the model is a plain hyperparameter (numbers, strings,
lists, dicts with a ``_target_``), so checkpoints load with ``torch.load(weights_only=True)`` and
``XrayClassifier.load_from_checkpoint(path)`` needs no Hydra config.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn

from pneumonia import CLASS_NAMES
from pneumonia.metrics.diagnostic import DiagnosticMetrics

log = logging.getLogger(__name__)


# A checkpoint names the classes that rebuild its network and optimiser. Only these prefixes are
# instantiated, so loading someone else's checkpoint cannot call an arbitrary function.
ALLOWED_TARGETS: dict[str, tuple[str, ...]] = {
    "net": ("pneumonia.", "torchvision.models.", "torch.nn."),
    "optimizer": ("torch.optim.",),
    "scheduler": ("torch.optim.lr_scheduler.",),
}


def check_target(role: str, config: Mapping[str, Any] | None) -> None:
    """Refuse a ``_target_`` outside ``ALLOWED_TARGETS[role]`` (extend that dict for your own code)."""
    if not config:
        return
    target = str(config.get("_target_", ""))
    if not target.startswith(ALLOWED_TARGETS[role]):
        raise ValueError(
            f"{role} _target_ {target!r} is not allowed; it must start with one of {ALLOWED_TARGETS[role]} "
            "(add your package to pneumonia.model.classifier.ALLOWED_TARGETS to use it)"
        )


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
    ) -> None:
        super().__init__()
        net, optimizer, scheduler, class_weights = map(
            to_plain, (net, optimizer, scheduler, class_weights)
        )
        for role, config in (("net", net), ("optimizer", optimizer), ("scheduler", scheduler)):
            check_target(role, config)
        # Hyperparameters are logged by the run itself, together with the metrics they produced.
        self.save_hyperparameters(logger=False)
        self.net: nn.Module = instantiate(net)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.net.to(memory_format=self.memory_format)
        self.train_metrics = DiagnosticMetrics(threshold)
        self.val_metrics = DiagnosticMetrics(threshold)
        self.test_metrics = DiagnosticMetrics(threshold)
        self.test_report: dict[str, Any] | None = None

    # ----- preprocessing and inference -------------------------------------------------------
    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``(B, 1, S, S)`` pixels -> normalised float input of the network."""
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        x = (x - self.hparams.pixel_mean) / self.hparams.pixel_std
        return x.contiguous(memory_format=self.memory_format)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits ``(B,)`` of PNEUMONIA for uint8 or [0, 1] float images ``(B, 1, S, S)``."""
        return self.net(self.preprocess(images))

    @torch.no_grad()
    def predict_proba(self, images: torch.Tensor) -> torch.Tensor:
        """P(PNEUMONIA) ``(B,)`` in eval mode."""
        return torch.sigmoid(self(images))

    # ----- loss -------------------------------------------------------------------------------
    def adopt_data_statistics(self, datamodule: Any) -> None:
        """Take class weights, pixel statistics and the data root from a set-up DataModule.

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

    def on_fit_start(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None:
            self.adopt_data_statistics(datamodule)
        log.info(
            "training with class weights %s (NORMAL, PNEUMONIA)",
            self.hparams.class_weights or [1.0, 1.0],
        )

    def on_train_start(self) -> None:
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
            logger.experiment.add_figure(f"{stage}/confusion_matrix", figure, self.current_epoch)

    # ----- optimisation -----------------------------------------------------------------------
    def configure_optimizers(self):
        optimizer = instantiate(self.hparams.optimizer, params=self.parameters())
        if not self.hparams.scheduler:
            return optimizer
        scheduler = dict(self.hparams.scheduler)
        interval = scheduler.pop("interval", "epoch")
        return {
            "optimizer": optimizer,
            "lr_scheduler": {
                "scheduler": instantiate(scheduler, optimizer=optimizer),
                "interval": interval,
            },
        }
