"""Scheduling the entropy gate's threshold over the RL phase."""

from __future__ import annotations

from typing import Literal

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn

from egspo.data.batches import IterationBatch
from egspo.losses.gate import HasEntropyGate
from egspo.schedules import ramp


class GateScheduler(Callback):
    """Moves the gate's value (`EntropyGate.set_value`) from `start` to `end` over the RL iterations.

    With the quantile rule, 0.5 -> 0.8 starts by updating the upper half of tokens fully and
    ends with the top 20%. The value is a pure function of the RL iteration, so a resumed run
    continues the schedule where it stopped. A loss without a gate (GRPO, ESPO, ... picked by a
    method overlay over a shared base config) leaves the schedule idle, with one warning.

    Args:
        start, end: gate value at the first and last RL iteration.
        schedule: "linear" or "cosine".
    """

    def __init__(
        self, start: float = 0.5, end: float = 0.8, schedule: Literal["linear", "cosine"] = "linear"
    ) -> None:
        self.start = start
        self.end = end
        self.schedule = schedule

    def value_at(self, rl_iteration: int, rl_iterations: int) -> float:
        progress = rl_iteration / max(rl_iterations - 1, 1)
        return ramp(self.start, self.end, progress, self.schedule)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not isinstance(pl_module.policy_loss, HasEntropyGate):
            rank_zero_warn(
                f"GateScheduler: policy_loss {type(pl_module.policy_loss).__name__} has no entropy "
                "gate; the schedule does nothing in this run"
            )

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: IterationBatch, batch_idx: int
    ) -> None:
        loss = pl_module.policy_loss
        if batch.phase != "rl" or not isinstance(loss, HasEntropyGate):
            return
        value = self.value_at(pl_module.rl_iteration, pl_module.rl_iterations)
        loss.gate.set_value(value)
        pl_module.log("gate/value", value)
