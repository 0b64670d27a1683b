"""Reward for ending with a final-answer marker, whatever the answer."""

from __future__ import annotations

import torch

from egspo.rewards.base import RewardFunction, RewardOutput
from egspo.rewards.extraction import MAX_COMPLETION_CHARS, has_final_marker


class FormatReward(RewardFunction):
    """1 when the last non-empty line holds ``#### X`` or a complete ``\\boxed{X}``, else 0.

    As ``MathReward``: a completion longer than ``max_completion_chars`` is not read and
    scores 0, so the cost is bounded on arbitrarily long output and no window decides what
    the last line is. ``answers`` is accepted for a uniform interface.
    """

    def __init__(self, max_completion_chars: int = MAX_COMPLETION_CHARS) -> None:
        self.max_completion_chars = max_completion_chars

    def scores(self, completions: list[str]) -> list[float]:
        return [float(len(c) <= self.max_completion_chars and has_final_marker(c)) for c in completions]

    def __call__(self, completions: list[str], answers: list[str] | None = None) -> RewardOutput:
        if answers is not None and len(answers) != len(completions):
            raise ValueError(f"{len(completions)} completions but {len(answers)} answers")
        scores = torch.tensor(self.scores(completions), dtype=torch.float32)
        mean = scores.mean().item() if len(completions) else 0.0
        return RewardOutput(scores, {"reward/mean": mean, "reward/format": mean})
