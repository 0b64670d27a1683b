"""Rollout generation before each RL iteration's update."""

from __future__ import annotations

from functools import partial

from lightning.pytorch import Callback, LightningModule, Trainer

from egspo.data.batches import IterationBatch
from egspo.rollout.builder import ExperienceBuilder


class RolloutCallback(Callback):
    """Collects the experience of an RL iteration into its batch, just before `training_step`.

    The work is its `ExperienceBuilder` (a plain component): sample, reward, group advantages,
    and the scoring passes the update needs. The result goes into `batch.experience` (and its
    statistics into `batch.rollout_stats`), the one path from this callback to the step and to
    the callbacks that look at rollouts afterwards. With dynamic sampling the data module's
    `refill_prompts(iteration, round)` supplies further prompts; its `teacher_responses` are the
    offline trajectories of an exploration bonus (OGER). Sampling runs under the trainer's
    precision context, as the training step's scoring does, so that both see the same numerics.

    An engine that keeps its own copy of the weights (`VLLMEngine`) is told after every batch
    that took optimizer steps, and syncs before it next samples (rollouts and evaluation alike).
    The module supplies this callback itself (`configure_callbacks`), so a run cannot forget it.
    """

    def __init__(self, builder: ExperienceBuilder) -> None:
        self.builder = builder
        self.steps_seen = 0

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: IterationBatch, batch_idx: int
    ) -> None:
        if batch.phase != "rl":
            return
        refill = getattr(trainer.datamodule, "refill_prompts", None)
        with trainer.precision_plugin.forward_context():
            batch.experience, batch.rollout_stats = self.builder.build(
                pl_module.policy,
                batch.prompts,
                batch.answers,
                refill=None if refill is None else partial(refill, batch.iteration),
                rl_iteration=batch.iteration - pl_module.sft_iterations,
                teachers=getattr(trainer.datamodule, "teacher_responses", None),
            )

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs, batch: IterationBatch, batch_idx: int
    ) -> None:
        if trainer.global_step != self.steps_seen:  # the weights changed: a copy held by the engine is stale
            self.steps_seen = trainer.global_step
            self.mark_stale()

    def on_load_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict) -> None:
        self.mark_stale()  # an engine built before the checkpoint's weights were loaded

    def mark_stale(self) -> None:
        """Tell an engine that holds its own copy of the weights to sync before it next samples."""
        mark_stale = getattr(self.builder.config.engine, "mark_stale", None)
        if callable(mark_stale):
            mark_stale()
