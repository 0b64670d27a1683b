"""Schedules over RL iterations: the SFT-mixing coefficient mu and ramps for gate knobs.

Each schedule is a pure function of the RL iteration, so a resumed run recomputes the same
value from its restored iteration counter.
"""

from __future__ import annotations

import math
from typing import Literal, Protocol, runtime_checkable


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
