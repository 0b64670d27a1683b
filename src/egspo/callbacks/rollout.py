"""Rollout generation before each RL iteration's update."""

from __future__ import annotations

from functools import partial

from lightning.pytorch import Callback, LightningModule, Trainer


class RolloutCallback(Callback):
    """Collects the experience of an RL iteration and hands it to `training_step` in the batch.

    The work is the module's `experience_builder` (`egspo.rollout.ExperienceBuilder`, a plain
    component): sample, reward, group advantages, and the scoring passes the update needs.
    The result goes into the batch under `egspo.module.EXPERIENCE` (and its statistics under
    `ROLLOUT_STATS`), the one interface between this callback and the step. With dynamic sampling
    the data module's `refill_prompts(iteration, round)` supplies further prompts; its
    `teacher_responses` are the offline trajectories of an exploration bonus. Sampling runs under
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
        refill = getattr(trainer.datamodule, "refill_prompts", None)
        with trainer.precision_plugin.forward_context():
            experience, stats = pl_module.experience_builder.build(
                pl_module.policy,
                batch["prompts"],
                batch["answers"],
                refill=None if refill is None else partial(refill, batch["iteration"]),
                rl_iteration=pl_module.rl_iteration,
                teachers=getattr(trainer.datamodule, "teacher_responses", None),
            )
        batch[EXPERIENCE] = experience
        batch[ROLLOUT_STATS] = stats
