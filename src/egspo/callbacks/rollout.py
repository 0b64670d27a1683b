"""Rollout generation before each RL iteration's update."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch.distributed.fsdp import FullyShardedDataParallel


class RolloutCallback(Callback):
    """Collects the experience of an RL iteration and hands it to `training_step` in the batch.

    The work is the module's `experience_builder` (`egspo.rollout.ExperienceBuilder`, a plain
    component): sample, reward, group advantages, and the scoring passes the update needs.
    The result goes into the batch under `egspo.module.EXPERIENCE` (and its statistics under
    `ROLLOUT_STATS`), the one interface between this callback and the step. Sampling runs under
    the trainer's precision context, as the training step's scoring does, so that both see the
    same numerics. The module supplies this callback itself (`configure_callbacks`), so a run
    cannot forget it.
    """

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: dict, batch_idx: int
    ) -> None:
        from egspo.module import EXPERIENCE, ROLLOUT_STATS

        if batch["phase"] != "rl":
            return
        with trainer.precision_plugin.forward_context(), _full_parameters(trainer.strategy.model):
            experience, stats = pl_module.experience_builder.build(
                pl_module.policy, batch["prompts"], batch["answers"]
            )
        batch[EXPERIENCE] = experience
        batch[ROLLOUT_STATS] = stats


def _full_parameters(wrapped: torch.nn.Module | None) -> AbstractContextManager:
    """FSDP1 shards flat parameters outside its own forward; sampling needs them whole.

    (FSDP2 units gather their parameters in their forward hooks, DDP holds them whole.)
    """
    if isinstance(wrapped, FullyShardedDataParallel):
        return FullyShardedDataParallel.summon_full_params(wrapped, writeback=False)
    return nullcontext()
