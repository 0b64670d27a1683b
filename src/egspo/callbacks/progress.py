"""A progress bar that names the phase next to reward and entropy."""

from __future__ import annotations

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import TQDMProgressBar


class PhaseProgressBar(TQDMProgressBar):
    """Lightning's bar, with `phase=sft|rl` and the iteration out of the total."""

    def get_metrics(self, trainer: Trainer, pl_module: LightningModule) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        phase = getattr(pl_module, "phase", None)
        if phase is not None:
            metrics = {"phase": phase, "it": f"{pl_module.iteration}/{pl_module.total_iterations}", **metrics}
        return metrics
