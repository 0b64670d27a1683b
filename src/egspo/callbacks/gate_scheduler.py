"""Scheduling the entropy gate's threshold over the RL phase."""

from __future__ import annotations

from typing import Literal

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn

from egspo.schedules import ramp


class GateScheduler(Callback):
    """Moves `policy_loss.gate.value` from `start` to `end` over the RL iterations.

    With the quantile rule, 0.5 -> 0.8 starts by updating the upper half of tokens fully and
    ends with the top 20%. The value is a pure function of the RL iteration, so a resumed run
    continues the schedule where it stopped.

    Args:
        start, end: gate value at the first and last RL iteration.
        schedule: "linear" or "cosine".
        attribute: the gate attribute to drive (`value` is the threshold or quantile).
    """

    def __init__(
        self,
        start: float = 0.5,
        end: float = 0.8,
        schedule: Literal["linear", "cosine"] = "linear",
        attribute: str = "value",
    ) -> None:
        self.start = start
        self.end = end
        self.schedule = schedule
        self.attribute = attribute
        self.active = False

    def value_at(self, rl_iteration: int, rl_iterations: int) -> float:
        progress = rl_iteration / max(rl_iterations - 1, 1)
        return ramp(self.start, self.end, progress, self.schedule)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.active = getattr(pl_module.policy_loss, "gate", None) is not None
        if not self.active:
            # A shared base config may carry the schedule while an overlay picks a loss without
            # a gate (GRPO, ESPO, ...): say so once and leave the run unchanged.
            rank_zero_warn(
                f"GateScheduler: policy_loss {type(pl_module.policy_loss).__name__} has no entropy "
                "gate; the schedule does nothing in this run"
            )
            return
        if not hasattr(pl_module.policy_loss.gate, self.attribute):
            raise ValueError(f"GateScheduler.attribute: the gate has no attribute {self.attribute!r}")

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: dict, batch_idx: int
    ) -> None:
        if pl_module.phase != "rl" or not self.active:
            return
        value = self.value_at(pl_module.rl_iteration, pl_module.hparams.rl_iterations)
        setattr(pl_module.policy_loss.gate, self.attribute, value)
        pl_module.log(f"gate/{self.attribute}", value)
