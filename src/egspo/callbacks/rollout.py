"""Rollout generation before each RL iteration's update."""

from __future__ import annotations

from lightning.pytorch import Callback, LightningModule, Trainer


class RolloutCallback(Callback):
    """Collects the experience of an RL iteration and hands it to `training_step` in the batch.

    The module supplies this callback itself (`configure_callbacks`), so a run cannot forget it.
    Generation, rewards, advantages and the old-policy scoring pass happen here; the update
    loop in the module only consumes `batch["experience"]`.
    """

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: dict, batch_idx: int
    ) -> None:
        if pl_module.phase != "rl" or pl_module.iteration >= pl_module.total_iterations:
            return
        experience, stats = pl_module.build_experience(batch)
        batch["experience"] = experience
        batch["rollout_stats"] = stats
