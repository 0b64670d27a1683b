"""Reward functions: ``reward(completions, answers) -> RewardOutput``."""

from egspo.rewards.base import RewardFunction, RewardOutput
from egspo.rewards.extraction import canonical_number, extract_answer, has_final_marker, last_boxed
from egspo.rewards.format_reward import FormatReward
from egspo.rewards.math_reward import MathReward
from egspo.rewards.verifier import VerifierPool, VerifyResult

__all__ = [
    "FormatReward",
    "MathReward",
    "RewardFunction",
    "RewardOutput",
    "VerifierPool",
    "VerifyResult",
    "canonical_number",
    "extract_answer",
    "has_final_marker",
    "last_boxed",
]
