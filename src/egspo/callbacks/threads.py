"""Torch's thread count fitted to the machine's free cores before every step (`egspo.threads`)."""

from __future__ import annotations

from lightning.pytorch import Callback, LightningModule, Trainer

from egspo.threads import ThreadGovernor


class AdaptiveThreads(Callback):
    """Before every training and evaluation step, sets torch's intra-op threads to the cores other
    processes leave free (`egspo.threads.ThreadGovernor`), and logs the count (`system/threads`)
    and the cores the others used (`system/other_cores`).

    The CLI adds it to every `fit` unless `OMP_NUM_THREADS` is set (a fixed count is the user's
    choice) or the config names it; on a quiet machine it keeps torch's own count.
    """

    def __init__(self, interval_seconds: float = 1.0) -> None:
        self.interval_seconds = interval_seconds
        self.governor: ThreadGovernor | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.governor = ThreadGovernor(interval_seconds=self.interval_seconds)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.governor is not None:
            self.governor.restore()

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int
    ) -> None:
        if self.governor is not None:
            self.governor.update()

    def on_validation_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if self.governor is not None:
            self.governor.update()

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        if self.governor is not None:
            metrics = {
                "system/threads": float(self.governor.threads),
                "system/other_cores": self.governor.other_cores,
            }
            pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)
