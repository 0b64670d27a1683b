"""Entropy statistics of each RL iteration's rollouts."""

from __future__ import annotations

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger

from egspo.data.batches import IterationBatch
from egspo.distributed import gather_variable

QUANTILES = (0.1, 0.5, 0.8, 0.9, 0.99)


class EntropyStatsLogger(Callback):
    """Logs the token-entropy distribution of the rollouts, and its split by correctness.

    Quantiles and means are taken over the valid response tokens of the whole rollout batch,
    all ranks' tokens together; the per-correctness means are averaged over ranks. The histogram
    goes to TensorBoard every `histogram_every` RL iterations.
    """

    def __init__(self, every_n_iterations: int = 1, histogram_every: int = 10) -> None:
        self.every_n_iterations = every_n_iterations
        self.histogram_every = histogram_every

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs, batch: IterationBatch, batch_idx: int
    ) -> None:
        experience = batch.experience
        if experience is None or pl_module.rl_iteration % self.every_n_iterations:
            return
        mask = experience.completion_mask.bool()
        values = gather_variable(experience.entropy[mask].float())
        if values.numel() == 0:
            return
        q = torch.quantile(values, torch.tensor(QUANTILES, device=values.device))
        metrics = {f"entropy/q{int(level * 100)}": v for level, v in zip(QUANTILES, q, strict=True)}
        metrics["entropy/mean"] = values.mean()
        mask_f = experience.completion_mask
        per_seq = (experience.entropy * mask_f).sum(1) / mask_f.sum(1).clamp(min=1)
        correct = experience.correct.bool()
        for name, rows in (("correct", correct), ("incorrect", ~correct)):
            group = gather_variable(per_seq[rows].float())  # every rank joins, even with no rows
            if group.numel():
                metrics[f"entropy/{name}_mean"] = group.mean()
        pl_module.log_dict(metrics)
        if pl_module.rl_iteration % self.histogram_every == 0:
            for logger in trainer.loggers:
                if isinstance(logger, TensorBoardLogger):
                    logger.experiment.add_histogram(
                        "entropy/tokens", values.cpu(), global_step=pl_module.iteration
                    )
