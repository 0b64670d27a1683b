"""Schedules: the SFT-mixing coefficient mu, ramps for gate knobs, and each phase's learning rate.

mu and the ramps are pure functions of the RL iteration, so a resumed run recomputes the same
value from its restored iteration counter; the learning-rate schedulers carry their own state.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal, Protocol, runtime_checkable

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler


@runtime_checkable
class MuSchedule(Protocol):
    """Maps the RL iteration (0-based) to the SFT-mixing coefficient mu."""

    def __call__(self, rl_iteration: int) -> float: ...


class ConstantMu:
    """mu fixed for the whole RL phase (CHORD-phi uses 0.1)."""

    def __init__(self, value: float = 0.1) -> None:
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"mu must be in [0, 1], got {value}")
        self.value = value

    def __call__(self, rl_iteration: int) -> float:
        return self.value


class ChordMuSchedule:
    """CHORD-mu: linear warm-up from 0 to `peak`, then cosine decay to `valley`.

    mu(k) = peak * k / warmup                                      for k < warmup
    mu(k) = valley + (peak - valley) * (1 + cos(pi * s)) / 2,     s = min(1, (k - warmup) / decay)
    """

    def __init__(
        self, peak: float = 0.9, valley: float = 0.05, warmup_iterations: int = 0, decay_iterations: int = 200
    ) -> None:
        if not 0.0 <= valley <= peak <= 1.0:
            raise ValueError(f"need 0 <= valley <= peak <= 1, got valley={valley}, peak={peak}")
        if warmup_iterations < 0 or decay_iterations < 1:
            raise ValueError("warmup_iterations must be >= 0 and decay_iterations >= 1")
        self.peak = peak
        self.valley = valley
        self.warmup_iterations = warmup_iterations
        self.decay_iterations = decay_iterations

    def __call__(self, rl_iteration: int) -> float:
        if rl_iteration < self.warmup_iterations:
            return self.peak * rl_iteration / self.warmup_iterations
        s = min(1.0, (rl_iteration - self.warmup_iterations) / self.decay_iterations)
        return self.valley + (self.peak - self.valley) * 0.5 * (1.0 + math.cos(math.pi * s))


def ramp(start: float, end: float, progress: float, kind: Literal["linear", "cosine"] = "linear") -> float:
    """Value between `start` and `end` at `progress` in [0, 1]; cosine eases in and out."""
    progress = min(max(progress, 0.0), 1.0)
    if kind == "cosine":
        progress = 0.5 * (1.0 - math.cos(math.pi * progress))
    elif kind != "linear":
        raise ValueError(f"ramp kind must be 'linear' or 'cosine', got {kind!r}")
    return start + (end - start) * progress


class PhaseLearningRates:
    """The learning rate of each phase: the SFT warm-up's schedule, then the RL phase's own.

    A scheduler built on the optimizer at the start of its phase (`start`) and stepped once per
    optimizer step by the update. At the start of RL, the RL base rate becomes every group's
    lr *and* `initial_lr`, the base any scheduler multiplies, so no LambdaLR (transformers'
    `get_*_schedule_with_warmup` included) brings the warm-up's rate back, and chainable
    schedulers (LinearLR, which multiply the current lr) start from the same base as LambdaLRs
    instead of from wherever the warm-up's schedule left the lr (0 after a decay to zero).
    A resumed run rebuilds the scheduler of its phase and loads its state.

    Args:
        sft, rl: build the warm-up's and the RL phase's scheduler from the optimizer (None: constant).
        rl_learning_rate: the RL phase's base rate (None: the optimizer's own, as configured,
            whatever the warm-up's schedule did to it).
    """

    def __init__(
        self,
        sft: Callable[[Optimizer], LRScheduler] | None = None,
        rl: Callable[[Optimizer], LRScheduler] | None = None,
        rl_learning_rate: float | None = None,
    ) -> None:
        self.factories = {"sft": sft, "rl": rl}
        self.rl_learning_rate = rl_learning_rate
        self.phase: str | None = None
        self.scheduler: LRScheduler | None = None
        self._resumed: dict | None = None

    def start(self, phase: str, optimizer: Optimizer) -> None:
        """Set up `phase`'s rate and scheduler (from the resumed state when it belongs to this phase)."""
        resumed, self._resumed = self._resumed, None
        starting = resumed is None or resumed["phase"] != phase
        if phase == "rl" and starting:
            for group in optimizer.param_groups:
                configured = group.get("initial_lr", group["lr"])  # kept there by the warm-up's scheduler
                base = self.rl_learning_rate if self.rl_learning_rate is not None else configured
                group["lr"] = group["initial_lr"] = base
        factory = self.factories[phase]
        self.scheduler = factory(optimizer) if factory is not None else None
        if self.scheduler is not None and not starting:
            self.scheduler.load_state_dict(resumed["scheduler"])
            for group, lr in zip(optimizer.param_groups, self.scheduler.get_last_lr(), strict=True):
                group["lr"] = lr
        self.phase = phase

    def state_dict(self) -> dict | None:
        if self.scheduler is None:
            return None
        return {"phase": self.phase, "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict | None) -> None:
        self._resumed = state
