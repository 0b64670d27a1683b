"""The reward interface: what the trainer calls and what every reward function returns."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor


@dataclass
class RewardOutput:
    """Per-sample rewards ``[N]`` (float32), batch metrics (plain floats, ready to log), and
    ``correct`` ``[N]`` (bool) where the reward can tell a right final answer apart from any
    shaping bonus (accuracy and entropy-by-correctness statistics use it)."""

    rewards: Tensor
    metrics: dict[str, float] = field(default_factory=dict)
    correct: Tensor | None = None


class RewardFunction:
    """Base of reward functions, the YAML type of a reward (``class_path`` picks a subclass).

    ``reward(completions, answers) -> RewardOutput``: one completion (decoded response text)
    and one gold answer per sample. Must not raise on bad model output: a sample that
    cannot be scored gets 0 and is counted in the metrics.
    """

    def __call__(self, completions: list[str], answers: list[str]) -> RewardOutput:
        raise NotImplementedError

    def close(self) -> None:
        """Release what the reward holds (worker processes); it stays usable afterwards."""
