"""Reward for ending with a final-answer marker, whatever the answer."""

from __future__ import annotations

import torch

from egspo.rewards.base import RewardFunction, RewardOutput
from egspo.rewards.extraction import has_final_marker


class FormatReward(RewardFunction):
    """1 when the last non-empty line holds ``#### X`` or a complete ``\\boxed{X}``, else 0.

    Only the tail of each completion (``max_completion_chars``) is inspected, so the cost
    is bounded on arbitrarily long output. ``answers`` is accepted for a uniform interface.
    """

    def __init__(self, max_completion_chars: int = 8192) -> None:
        self.max_completion_chars = max_completion_chars

    def scores(self, completions: list[str]) -> list[float]:
        return [float(has_final_marker(c[-self.max_completion_chars :])) for c in completions]

    def __call__(self, completions: list[str], answers: list[str] | None = None) -> RewardOutput:
        if answers is not None and len(answers) != len(completions):
            raise ValueError(f"{len(completions)} completions but {len(answers)} answers")
        scores = torch.tensor(self.scores(completions), dtype=torch.float32)
        mean = scores.mean().item() if len(completions) else 0.0
        return RewardOutput(scores, {"reward/mean": mean, "reward/format": mean})
