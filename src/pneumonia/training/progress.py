"""The training progress bar, refreshed without stalling an accelerator.

Each refresh of Lightning's bar reads the logged step loss back from the device: a host
synchronisation, after which the GPU idles until Python queues the next step. Lightning refreshes
after every step; :class:`StepProgressBar` does so on the CPU (where reading costs nothing) and
every ``accelerator_refresh_rate`` steps on an accelerator.

Under DDP the bar lives on rank zero only, and at the end of a training epoch it asks for the
epoch's values (``train/loss_epoch``) before anyone else has: they are synchronised across the
ranks when first read, so rank zero alone entered a collective while the others entered the
next one (the epoch's metrics), and the run died with gloo's "collective mismatch" (or exchanged
the wrong tensors). :class:`StepProgressBar` reads them on every rank first.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar


class StepProgressBar(TQDMProgressBar):
    """``TQDMProgressBar`` with its refresh rate chosen by the device it trains on.

    Args:
        refresh_rate: steps between refreshes; ``None``: 1 on the CPU, ``accelerator_refresh_rate``
            elsewhere.
        accelerator_refresh_rate: the automatic rate on a GPU (at thousands of images per second,
            50 steps of 32 images still refresh several times a second).
    """

    def __init__(self, refresh_rate: int | None = None, accelerator_refresh_rate: int = 50) -> None:
        super().__init__(refresh_rate=1 if refresh_rate is None else refresh_rate)
        self._automatic = refresh_rate is None
        self.accelerator_refresh_rate = int(accelerator_refresh_rate)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self._automatic:
            on_cpu = trainer.strategy.root_device.type == "cpu"
            # Through Lightning's own resolution: TQDM_MINITERS and Colab still apply.
            self._refresh_rate = self._resolve_refresh_rate(
                1 if on_cpu else self.accelerator_refresh_rate
            )

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.world_size > 1:
            trainer.progress_bar_metrics  # noqa: B018  (every rank syncs the epoch values, in order)
        super().on_train_epoch_end(trainer, pl_module)
