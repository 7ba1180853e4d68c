"""The LightningModule: preprocessing, class-weighted BCE, diagnostic metrics, a stored operating point.

Everything a checkpoint needs to rebuild the model is a plain hyperparameter (numbers, strings,
lists, dicts with a ``_target_``), so checkpoints load with ``torch.load(weights_only=True)`` and
``XrayClassifier.load_from_checkpoint(path)`` needs no Hydra config. The network, optimiser,
scheduler, augmentation, normalisation and threshold rule are built only from classes in
:mod:`pneumonia.model.registry`, and every other hyperparameter is type-checked, so a checkpoint
from a stranger cannot choose code to run.

The operating point travels with the weights: after every validation epoch a temperature is fitted
on the validation logits (Guo et al. 2017) and a decision threshold is chosen on the calibrated
validation probabilities by the configured rule. Both are buffers, so the best checkpoint carries
the ones fitted with its own weights, and test, eval, explain and predict use them.

Under DDP every epoch-level value covers all ranks: the losses are torchmetrics means over every
rank's images; the metrics come from torchmetrics states gathered across ranks, and the operating
point and calibration errors from the gathered logits of the epoch (the operating point is then
broadcast from rank zero, so every rank stores the same buffers). Those are the same on every rank
and logged with ``sync_dist``. With the evaluation samplers of
:class:`~pneumonia.data.datamodule.ChestXrayDataModule` (every image once) the values equal those
of one process.
"""

from __future__ import annotations

import logging
import math
import pickle
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import nn
from torchmetrics.aggregation import CatMetric, MeanMetric

from pneumonia import CLASS_NAMES, check_image_size
from pneumonia.errors import CheckpointError, ConfigError
from pneumonia.metrics.calibration import (
    ECE_BINS,
    calibrated_probabilities,
    expected_calibration_error,
    fit_temperature,
)
from pneumonia.metrics.diagnostic import DiagnosticMetrics
from pneumonia.metrics.evaluation import epoch_metrics_step, log_figure
from pneumonia.metrics.operating_point import choose_threshold  # importing registers the rules
from pneumonia.model import registry
from pneumonia.model.modes import eval_mode
from pneumonia.training import schedulers as _schedulers  # also registers the schedulers

# The study's threshold: its table is always reported at it, whatever rule a run uses.
STUDY_THRESHOLD = 0.5
# What a stored threshold and temperature may be (hyperparameters and checkpoint buffers alike).
THRESHOLD_RANGE = (0.0, 1.0)
TEMPERATURE_RANGE = (1e-3, 1e3)
MAX_NETWORK_WEIGHTS = 2**30
"""The most weights (and buffer values) a network may have: 4 GiB in float32. The largest built-in
one, the study CNN at 1024 px, has 268 M. A config or a checkpoint of a few bytes could otherwise
ask for a network that exhausts memory while it is initialised, before any weight is compared."""

# The study's normalisation: the training pixels' mean and standard deviation.
DEFAULT_NORMALIZATION = {"_target_": "pneumonia.model.normalization.DatasetStandardization"}

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
        threshold: probability at or above which a prediction is PNEUMONIA; replaced after each
            validation epoch by the one ``operating_point`` chooses.
        channels_last: run convolutions in NHWC memory layout (about 1.4x faster on CPU with oneDNN,
            and the layout tensor cores want); results are the same.
        data_root: the data the model was fitted on; filled when fitting, so ``explain.py`` can find
            the images of a run's ``split.csv``.
        split: the settings that made the train/val/test split (root, seed, fractions, grouping,
            a digest of the file list); filled when fitting, so a resume that would change the
            split is refused.
        augmentation: config of a batch augmentation (``pneumonia.model.augmentation``), applied
            to training batches only, on the model's device; ``None``: none (the study).
        normalization: config of the input normalisation (``pneumonia.model.normalization``);
            ``None``: the training pixels' mean and standard deviation (the study).
        label_smoothing: ``eps`` in [0, 0.5): training targets become ``eps/2`` and ``1 - eps/2``.
        operating_point: config of the rule choosing the threshold on validation
            (``pneumonia.metrics.operating_point``); ``None``: keep ``threshold``.
        temperature: divides the logits before the sigmoid; fitted on validation after each epoch.
        training: how the steps were taken (batch size, precision, gradient accumulation and
            clipping); recorded so a resume that would take them otherwise is refused.

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
        augmentation: Mapping[str, Any] | None = None,
        normalization: Mapping[str, Any] | None = None,
        label_smoothing: float = 0.0,
        operating_point: Mapping[str, Any] | None = None,
        temperature: float = 1.0,
        training: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        net, optimizer, scheduler, class_weights, split, training = map(
            to_plain, (net, optimizer, scheduler, class_weights, split, training)
        )
        augmentation, normalization, operating_point = (
            to_plain(node) or None for node in (augmentation, normalization, operating_point)
        )
        # Everything is checked before anything is built: a checkpoint is untrusted data.
        registry.check_bounded(
            [net, optimizer, scheduler, class_weights, split, augmentation, normalization,
             operating_point, data_root, training],
            "the hyperparameters",
        )  # fmt: skip
        build_net = registry.resolve("net", net)
        registry.check("optimizer", optimizer)
        registry.check("scheduler", _without_interval(scheduler))
        for role, node in (
            ("augmentation", augmentation),
            ("normalization", normalization),
            ("operating_point", operating_point),
            ("scheduler", scheduler),
        ):
            if node is not None and not (isinstance(node, Mapping) and registry.TARGET in node):
                raise registry.UnsafeConfigError(
                    f"{role}={node!r} must be a mapping with a {registry.TARGET}, or null"
                )
        build_augmentation = registry.resolve("augmentation", augmentation or {})
        build_normalization = registry.resolve(
            "normalization", normalization or DEFAULT_NORMALIZATION
        )
        if operating_point is not None:
            registry.build("operating_point", operating_point)  # checks its arguments
        if scheduler and scheduler.get("interval", "epoch") not in ("epoch", "step"):
            raise ValueError(
                f"scheduler.interval={scheduler.get('interval')!r} must be 'epoch' or 'step'"
            )
        _check_plain_hyperparameters(
            net, image_size, class_weights, pixel_mean, pixel_std, threshold, channels_last, data_root,
            split, label_smoothing, temperature,
        )  # fmt: skip
        # Hyperparameters are logged by the run itself, together with the metrics they produced.
        self.save_hyperparameters(logger=False)
        _check_network_size(build_net)
        self.net: nn.Module = build_net()
        self.augmentation: nn.Module | None = build_augmentation() if augmentation else None
        self.normalization: nn.Module = build_normalization(
            pixel_mean=pixel_mean, pixel_std=pixel_std
        )
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.net.to(memory_format=self.memory_format)
        # Buffers, not only hyperparameters: loading the best checkpoint's weights (trainer.test
        # with ckpt_path) restores the operating point fitted with those weights.
        self.register_buffer("decision_threshold", torch.tensor(float(threshold)))
        self.register_buffer("temperature", torch.tensor(float(temperature)))
        self.train_metrics = DiagnosticMetrics(threshold)
        self.val_metrics = DiagnosticMetrics(STUDY_THRESHOLD)
        self.test_metrics = DiagnosticMetrics(threshold)
        self.test_metrics_at_study_threshold = DiagnosticMetrics(STUDY_THRESHOLD)
        # Logits and labels of a whole evaluation epoch (synchronised under DDP), for the
        # temperature, the threshold and the calibration error.
        self.epoch_logits = CatMetric(nan_strategy="disable")
        self.epoch_targets = CatMetric(nan_strategy="disable")
        # Mean losses over every image of the epoch on all ranks: torchmetrics sums the states
        # across ranks. (Lightning's mean of a logged tensor with sync_dist divides the summed
        # image count by the number of ranks as an integer on gloo, so an odd count is off, and
        # on a per-step value it adds a barrier and an all-reduce to every training step.)
        # No NaN check: a check is a host sync per step, and a NaN loss must show, not vanish.
        self.train_loss = MeanMetric(nan_strategy="disable")
        self.val_loss = MeanMetric(nan_strategy="disable")
        self.test_loss = MeanMetric(nan_strategy="disable")
        self.test_report: dict[str, Any] | None = None
        self.test_outputs: tuple[np.ndarray, np.ndarray] | None = None

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
            how = " with weights_only=True" if isinstance(err, pickle.UnpicklingError) else ""
            raise CheckpointError(
                f"{checkpoint_path} could not be loaded{how} ({type(err).__name__}: {first_line})"
            ) from err

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse weights that are not finite, whichever way the checkpoint is loaded."""
        try:
            registry.check_bounded(checkpoint, "the checkpoint")
        except registry.UnsafeConfigError as err:
            raise CheckpointError(str(err)) from err
        state = checkpoint.get("state_dict")
        if not isinstance(state, Mapping):
            raise CheckpointError("the checkpoint has no state_dict of weights")
        # Checkpoints from before the stored operating point: their threshold, no temperature.
        if isinstance(state, dict):
            hparams = checkpoint.get("hyper_parameters")
            hparams = hparams if isinstance(hparams, Mapping) else {}
            for key, default in (
                ("decision_threshold", hparams.get("threshold", STUDY_THRESHOLD)),
                ("temperature", hparams.get("temperature", 1.0)),
            ):
                if key not in state and isinstance(default, int | float):
                    state[key] = torch.tensor(float(default))
            for key, (low, high) in (
                ("decision_threshold", THRESHOLD_RANGE),
                ("temperature", TEMPERATURE_RANGE),
            ):
                value = state.get(key)
                if isinstance(value, torch.Tensor) and value.numel() == 1:
                    number = float(value)
                    if not low <= number <= high:  # NaN fails too
                        raise CheckpointError(
                            f"the checkpoint's stored {key} is {number}, outside [{low}, {high}]; "
                            "its decisions would be meaningless"
                        )
        self._check_weights_fit(state)
        for name, tensor in state.items():
            # In float32, as the network computes: a float64 1e300 is finite only as stored.
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor.float()).all()):
                raise CheckpointError(
                    f"the checkpoint's weights {name} hold NaN or infinite values; it comes "
                    "from a diverged run and gives no meaningful predictions"
                )

    def _check_weights_fit(self, state: Mapping[str, Any]) -> None:
        """Every stored tensor must be one of this model's, of its shape and kind of dtype.

        Checked before any value is read: a tensor of another name, shape, or a stride-0 view
        claiming billions of elements would otherwise be expanded by the finiteness check (a file
        of bytes asking for gigabytes), and a complex one would pass it.
        """
        expected = self.state_dict()
        unknown = [k for k in state if k not in expected]
        missing = [k for k in expected if k not in state]
        if unknown or missing:
            raise CheckpointError(
                f"the checkpoint's weights do not belong to this network: unknown {unknown[:5]}"
                f"{' ...' if len(unknown) > 5 else ''}, missing {missing[:5]}"
                f"{' ...' if len(missing) > 5 else ''}"
            )
        for name, tensor in state.items():
            want = expected[name]
            if not isinstance(tensor, torch.Tensor) or tensor.layout != torch.strided:
                raise CheckpointError(f"the checkpoint's {name} is not a dense tensor")
            if tuple(tensor.shape) != tuple(want.shape):
                raise CheckpointError(
                    f"the checkpoint's {name} has shape {tuple(tensor.shape)}, but this network's "
                    f"has {tuple(want.shape)}"
                )
            if tensor.is_complex() or tensor.is_floating_point() != want.is_floating_point():
                raise CheckpointError(
                    f"the checkpoint's {name} is {tensor.dtype}, but this network's is {want.dtype}"
                )

    # ----- preprocessing and inference -------------------------------------------------------
    @property
    def threshold(self) -> float:
        """The stored decision threshold: P(PNEUMONIA) at or above it is called PNEUMONIA."""
        return float(self.decision_threshold)

    def probabilities_from_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Calibrated P(PNEUMONIA) ``(B,)`` of logits ``(B,)``: ``sigmoid(logits / temperature)``.

        float32, or float64 for float64 logits (metrics use those: a small temperature saturates
        float32 probabilities at exactly 1.0, which would tie images AUROC ranks apart).
        """
        logits = logits if logits.dtype == torch.float64 else logits.float()
        return torch.sigmoid(logits / self.temperature.to(logits.device, logits.dtype))

    def set_operating_point(self, threshold: float, temperature: float) -> None:
        """Store a decision threshold and a temperature (buffers and hyperparameters)."""
        self.decision_threshold.fill_(float(threshold))
        self.temperature.fill_(float(temperature))
        self.hparams.threshold = float(threshold)
        self.hparams.temperature = float(temperature)

    def preprocess(self, images: torch.Tensor, augment: bool = False) -> torch.Tensor:
        """uint8 or [0, 1] float ``(B, 1, S, S)`` pixels -> the network's input.

        ``augment``: apply the training augmentation (training steps only; a no-op in eval mode).
        """
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        if augment and self.augmentation is not None:
            x = self.augmentation(x)
        x = self.normalization(x)
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
            ``(B,)`` float64 tensor on the model's device (``B = 1`` for one image): float64, as
            the test metrics use, since a small temperature saturates float32 probabilities at
            exactly 1.0 and ties images that AUROC and the threshold tell apart.

        Raises:
            ValueError: another shape, size, dtype or value range, saying what is expected.
        """
        batch = self._as_image_batch(images)
        with eval_mode(self), torch.no_grad():
            return self.probabilities_from_logits(self(batch).double())

    def _as_image_batch(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        if isinstance(images, np.ndarray) and not images.flags.writeable:
            images = images.copy()  # load_grayscale's arrays are read-only; torch warns on them
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
        if hasattr(self.normalization, "set_statistics"):
            self.normalization.set_statistics(self.hparams.pixel_mean, self.hparams.pixel_std)
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
        self._check_schedule_covers_the_run()
        self._check_restored_schedule()
        if self.global_step > 0:
            return  # a resumed run logged them when it started
        # The weights in use belong next to the curves they shaped, not only in the log file.
        weights = self.hparams.class_weights or [1.0, 1.0]
        values = {
            f"class_weight/{name}": float(w) for name, w in zip(CLASS_NAMES, weights, strict=True)
        }
        for logger in self.loggers:
            logger.log_metrics(values, step=self.global_step)

    def _check_restored_schedule(self) -> None:
        """Refuse a resumed schedule that is not the configured one (a tampered or foreign file).

        Lightning loads the checkpoint's scheduler state over the one ``configure_optimizers``
        built: its base learning rates, length or OneCycle peak would silently replace the config's.
        """
        configured = getattr(self, "_configured_schedule", None)
        configs = getattr(self.trainer, "lr_scheduler_configs", None) or []
        if configured is None or len(configs) != 1 or len(self.trainer.optimizers) != 1:
            return
        restored = _schedulers.schedule_settings(self.trainer.optimizers[0], configs[0].scheduler)
        differences = _schedulers.schedule_differences(configured, restored)
        if differences:
            raise CheckpointError(
                "the resumed checkpoint's learning-rate schedule is not the configured one ("
                + "; ".join(differences[:4])
                + "); resume from a checkpoint this configuration wrote"
            )

    def _check_schedule_covers_the_run(self) -> None:
        """Refuse to train past the end of a whole-run schedule (a resume with more epochs).

        A resumed scheduler keeps the length it was built with: warm-up + cosine would train the
        extra steps at learning rate 0, one-cycle would fail at its last step.
        """
        for config in self.trainer.lr_scheduler_configs:
            total = getattr(config.scheduler, "total_steps", None)
            steps = self.trainer.estimated_stepping_batches
            if isinstance(total, int) and math.isfinite(steps) and steps > total:
                raise ConfigError(
                    f"the learning-rate schedule of this run was built for {total} optimiser "
                    f"steps, but trainer.max_epochs={self.trainer.max_epochs} asks for {int(steps)}: "
                    "a whole-run schedule (warm-up + cosine, one-cycle) cannot be extended; resume "
                    "with the original trainer.max_epochs, or start a new run"
                )

    def _loss(self, logits: torch.Tensor, targets: torch.Tensor, training: bool) -> torch.Tensor:
        weights = None
        if training and self.hparams.class_weights is not None:
            weights = self._class_weight_tensor(logits.device)[targets.long()]
        soft_targets = targets.to(logits.dtype)
        smoothing = float(self.hparams.get("label_smoothing", 0.0))
        if training and smoothing:
            soft_targets = soft_targets * (1 - smoothing) + smoothing / 2
        return F.binary_cross_entropy_with_logits(logits, soft_targets, weight=weights)

    def _class_weight_tensor(self, device: torch.device) -> torch.Tensor:
        # Built once per device and weights, not per step: a host-to-device copy per step stalls GPUs.
        key = (device, tuple(self.hparams.class_weights))
        cached_key, cached = getattr(self, "_class_weight_cache", (None, None))
        if cached_key != key:
            cached = torch.tensor(key[1], device=device, dtype=torch.float32)
            self._class_weight_cache = (key, cached)
        return cached

    # ----- steps ------------------------------------------------------------------------------
    def _evaluation_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], metrics: list[DiagnosticMetrics]
    ) -> torch.Tensor:
        images, targets = batch
        # Full precision even under bf16-mixed training: bf16 logits keep 8 bits of mantissa, which
        # would tie images for AUROC and coarsen the threshold and the temperature fitted on them.
        # (cuDNN's default TF32 convolutions are left alone: they round products, not the fp32
        # logits, so they add noise of about 1e-3 but no ties.)
        with torch.autocast(images.device.type, enabled=False):
            logits = self(images).float()
        # Validation and test losses are the plain BCE of the uncalibrated logits, comparable
        # across weighting schemes and epochs.
        loss = self._loss(logits, targets, training=False)
        probabilities = self.probabilities_from_logits(logits.double())
        for metric in metrics:
            metric.update(probabilities, targets)
        self.epoch_logits.update(logits)
        self.epoch_targets.update(targets.float())
        return loss

    @staticmethod
    def _per_image(loss: torch.Tensor, images: int) -> torch.Tensor:
        """A batch's mean loss once per image, so a MeanMetric weighs batches by their size.

        (MeanMetric drops its ``weight`` argument with ``nan_strategy="disable"``, torchmetrics
        1.9; an expanded view costs no copy and no host-to-device transfer.)
        """
        return loss.detach().float().reshape(()).expand(images)

    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> torch.Tensor:
        images, targets = batch
        logits = self.net(self.preprocess(images, augment=True)).float()
        # The training loss is class-weighted and smoothed (what is optimised).
        loss = self._loss(logits, targets, training=True)
        self.train_metrics.update(torch.sigmoid(logits.detach()), targets)
        # train/loss_step: this rank's batch; train/loss_epoch: every image of the epoch, all ranks.
        self.train_loss(self._per_image(loss, len(targets)))
        self.log("train/loss", self.train_loss, on_step=True, on_epoch=True, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        loss = self._evaluation_step(batch, [self.val_metrics])
        self.val_loss.update(self._per_image(loss, len(batch[1])))
        self.log("val/loss", self.val_loss, on_epoch=True, prog_bar=True)

    def on_test_epoch_start(self) -> None:
        # The threshold of the weights under test (loaded with the checkpoint), not the last epoch's.
        self.test_metrics.threshold = self.threshold

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        loss = self._evaluation_step(
            batch, [self.test_metrics, self.test_metrics_at_study_threshold]
        )
        self.test_loss.update(self._per_image(loss, len(batch[1])))
        self.log("test/loss", self.test_loss, on_epoch=True)

    def on_train_epoch_end(self) -> None:
        # A resume from a checkpoint written before its epoch ended (validation every n > 1
        # epochs) re-enters that epoch's end without a batch: there is nothing to report, and
        # empty metrics would log NaN over the epoch's real training figures.
        if self.train_metrics.updated:
            self._log_epoch("train", self.train_metrics)

    def on_validation_epoch_end(self) -> None:
        # Validation metrics at the study's fixed threshold: comparable between epochs and runs,
        # and not judged at a threshold chosen on the same images.
        self._log_epoch("val", self.val_metrics)
        logits, targets = self._epoch_outputs()
        if self.trainer.sanity_checking or len(logits) == 0 or not bool(logits.isfinite().all()):
            return  # non-finite outputs: StopOnDivergence stops the run, naming the loss
        temperature = fit_temperature(logits, targets)
        uncalibrated = torch.sigmoid(logits)
        calibrated = calibrated_probabilities(logits, temperature)
        threshold = self.threshold
        if self.hparams.get("operating_point"):
            threshold, _ = choose_threshold(self.hparams.operating_point, calibrated, targets)
        # Every rank fitted the same numbers on the same gathered outputs; rank zero's are taken
        # so that the stored operating point cannot differ between ranks by a rounding.
        threshold, temperature = self.trainer.strategy.broadcast(
            (float(threshold), float(temperature)), src=0
        )
        self.set_operating_point(threshold, temperature)
        self.log_dict(
            {
                "val/threshold": threshold,
                "val/temperature": temperature,
                "val/ece": expected_calibration_error(calibrated, targets),
                "val/ece_uncalibrated": expected_calibration_error(uncalibrated, targets),
            },
            sync_dist=True,
        )

    def _epoch_outputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every logit and label of the evaluation epoch (all ranks), on the CPU; then reset."""
        if self.epoch_targets.update_count == 0:
            empty = torch.zeros(0)
            return empty, empty
        logits = self.epoch_logits.compute().float().cpu().reshape(-1)
        targets = self.epoch_targets.compute().float().cpu().reshape(-1)
        self.epoch_logits.reset()
        self.epoch_targets.reset()
        return logits, targets

    def on_test_epoch_end(self) -> None:
        confusion, values = self._log_epoch("test", self.test_metrics, keep=True)
        at_study = self.test_metrics_at_study_threshold
        study_values = {name: float(v) for name, v in at_study.compute().items()}
        logits, targets = self._epoch_outputs()
        calibrated = self.probabilities_from_logits(logits)
        # Non-finite outputs: no calibration; the report writer refuses the run, naming the loss.
        finite = bool(logits.isfinite().all()) and len(logits) > 0
        ece = expected_calibration_error(calibrated, targets) if finite else math.nan
        ece_uncalibrated = (
            expected_calibration_error(torch.sigmoid(logits), targets) if finite else math.nan
        )
        self.log_dict({"test/ece": ece, "test/ece_uncalibrated": ece_uncalibrated}, sync_dist=True)
        rule = self.hparams.get("operating_point")
        self.test_report = {
            "metrics": {name: float(v) for name, v in values.items()},
            "confusion_matrix": confusion.tolist(),
            "confusion_matrix_layout": "rows: true (NORMAL, PNEUMONIA); columns: predicted (NORMAL, PNEUMONIA)",
            "images": int(confusion.sum()),
            "threshold": self.threshold,
            "threshold_rule": (rule or {}).get("_target_", "fixed").rsplit(".", 1)[-1],
            "temperature": float(self.temperature),
            "calibration": {"ece": ece, "ece_uncalibrated": ece_uncalibrated, "bins": ECE_BINS},
            f"metrics_at_{STUDY_THRESHOLD}": study_values,
            f"confusion_matrix_at_{STUDY_THRESHOLD}": at_study.confusion_matrix().tolist(),
        }
        self.test_outputs = (calibrated.numpy(), targets.numpy()) if finite else None
        if finite:
            self._log_reliability_figure("test", calibrated, targets)
        self.test_metrics.reset()
        at_study.reset()

    def _log_epoch(self, stage: str, metrics: DiagnosticMetrics, keep: bool = False):
        confusion = metrics.confusion_matrix().cpu()
        values = metrics.compute()
        headline = "balanced_accuracy"
        # torchmetrics gathered the states of every rank, so the values are the same on each;
        # sync_dist averages identical numbers (exact for 2 ranks) and keeps Lightning informed.
        self.log(
            f"{stage}/{headline}", values[headline].float(), prog_bar=stage == "val",
            sync_dist=True,
        )  # fmt: skip
        self.log_dict(
            {f"{stage}/{k}": v.float() for k, v in values.items() if k != headline},
            sync_dist=True,
        )
        if stage != "train" and not self.trainer.sanity_checking:
            self._log_confusion_figure(stage, confusion)
        if not keep:
            metrics.reset()
        return confusion, values

    def _log_reliability_figure(
        self, stage: str, probabilities: torch.Tensor, targets: torch.Tensor
    ) -> None:
        from pneumonia.metrics.calibration import reliability_diagram

        self._add_figure(
            f"{stage}/reliability_diagram",
            lambda: reliability_diagram(probabilities, targets, title=f"{stage} reliability"),
        )

    def _log_confusion_figure(self, stage: str, confusion: torch.Tensor) -> None:
        from pneumonia.metrics.figures import confusion_matrix_figure

        self._add_figure(
            f"{stage}/confusion_matrix",
            lambda: confusion_matrix_figure(
                confusion.numpy(), CLASS_NAMES, f"{stage}, epoch {self.current_epoch}"
            ),
        )

    def _add_figure(self, tag: str, make_figure: Callable[[], Any]) -> None:
        """Draw a figure (only if a TensorBoard logger will take it) on rank zero and log it."""
        tensorboards = [lg for lg in self.loggers if isinstance(lg, TensorBoardLogger)]
        if tensorboards and self.trainer.is_global_zero:
            log_figure(tensorboards, tag, make_figure(), epoch_metrics_step(self.trainer))

    # ----- optimisation -----------------------------------------------------------------------
    def configure_optimizers(self):
        optimizer = registry.build(
            "optimizer",
            self.hparams.optimizer,
            params=self.parameters(),
            **_fused_step(
                self.hparams.optimizer, self.parameters(), clipped=_clips_gradients(self)
            ),
        )
        if not self.hparams.scheduler:
            return optimizer
        interval = self.hparams.scheduler.get("interval", "epoch")
        scheduler = _without_interval(self.hparams.scheduler)
        if "total_steps" in scheduler and scheduler["total_steps"] is None:
            # Schedules over the whole run (one-cycle, warm-up + cosine) learn its length here.
            steps = self.trainer.estimated_stepping_batches
            if not math.isfinite(steps):
                raise ValueError(
                    f"{scheduler['_target_']} with total_steps=null needs a run of known length: "
                    "set trainer.max_epochs (>= 1) or trainer.max_steps, or give total_steps"
                )
            scheduler["total_steps"] = int(steps)
        built = registry.build("scheduler", scheduler, optimizer=optimizer)
        # Before a resume restores the checkpoint's schedule over it: see on_train_start.
        self._configured_schedule = _schedulers.schedule_settings(optimizer, built)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": built, "interval": interval}}


# Optimisers whose single-kernel ("fused") step PyTorch has on the CPU and on CUDA.
_FUSABLE = {"torch.optim.Adam", "torch.optim.AdamW"}


def _clips_gradients(module: L.LightningModule) -> bool:
    trainer = module._trainer  # None when the optimizer is built outside a Trainer
    return trainer is not None and bool(trainer.gradient_clip_val)


def _fused_step(
    optimizer: Mapping[str, Any], parameters: Any, clipped: bool = False
) -> dict[str, bool]:
    """``{"fused": True}`` for Adam/AdamW on CPU or CUDA float parameters, unless configured.

    The same update as the default multi-tensor step in one kernel: on the 2-core CPU the study
    CNN's Adam step took 2.4 ms instead of 9 ms (6% of a bf16 training step). Chosen here, not in
    the config, so checkpoints of earlier runs still resume with the optimizer they recorded. Not
    with gradient clipping (``clipped``): Lightning refuses to clip for a fused optimizer under
    mixed precision, and clipping is the advice a diverged run gives.
    """
    if (
        clipped
        or optimizer.get(registry.TARGET) not in _FUSABLE
        or {"fused", "foreach"} & set(optimizer)
    ):
        return {}
    fusable = all(
        p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.float64)
        for p in parameters
    )
    return {"fused": True} if fusable else {}


def _check_network_size(build_net: Callable[[], nn.Module]) -> None:
    """Refuse a network above ``MAX_NETWORK_WEIGHTS``, counted on the meta device (no memory)."""
    with torch.device("meta"):
        probe = build_net()
    weights = sum(t.numel() for t in (*probe.parameters(), *probe.buffers()))
    if weights > MAX_NETWORK_WEIGHTS:
        raise ValueError(
            f"the network would have {weights:,} weights, more than the {MAX_NETWORK_WEIGHTS:,} "
            "this framework builds; lower image_size or the network's widths"
        )


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
    label_smoothing,
    temperature,
) -> None:
    """Type and range checks of the non-network hyperparameters (a checkpoint may hold anything)."""

    def number(name: str, value: Any, low: float, high: float = math.inf) -> None:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"{name}={value!r} must be a number")
        if not (low <= value <= high) or math.isnan(value):
            raise ValueError(f"{name}={value!r} must be within [{low}, {high}]")

    check_image_size(image_size)
    if isinstance(net, Mapping) and net.get("image_size", image_size) != image_size:
        raise ValueError(
            f"net.image_size={net.get('image_size')!r} differs from image_size={image_size}"
        )
    number("pixel_mean", pixel_mean, 0.0, 1.0)
    number("pixel_std", pixel_std, 1e-6, 1.0)
    number("threshold", threshold, *THRESHOLD_RANGE)
    number("label_smoothing", label_smoothing, 0.0, 0.4999)
    number("temperature", temperature, *TEMPERATURE_RANGE)
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
