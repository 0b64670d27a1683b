"""Progress bars that name the phase and iteration next to reward and entropy."""

from __future__ import annotations

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar, TQDMProgressBar


class _PhaseMetrics:
    def get_metrics(self, trainer: Trainer, pl_module: LightningModule) -> dict:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        phase = getattr(pl_module, "phase", None)
        if phase is None:
            return metrics
        return {"phase": phase, "it": f"{pl_module.iteration}/{pl_module.total_iterations}", **metrics}


class PhaseTQDMProgressBar(_PhaseMetrics, TQDMProgressBar):
    """Lightning's TQDM bar with `phase=sft|rl` and the iteration out of the total."""


class PhaseRichProgressBar(_PhaseMetrics, RichProgressBar):
    """Lightning's Rich bar with `phase=sft|rl` and the iteration out of the total."""


def phase_progress_bar(current: ProgressBar | None) -> Callback | None:
    """The phase-aware twin of the trainer's default bar; None when it is disabled or custom."""
    if type(current) is TQDMProgressBar:
        return PhaseTQDMProgressBar()
    if type(current) is RichProgressBar:
        return PhaseRichProgressBar()
    return None
