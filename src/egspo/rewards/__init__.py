"""Reward functions: ``reward(completions, answers) -> RewardOutput``."""

from egspo.rewards.audit import GoldAudit, audit_golds
from egspo.rewards.base import RewardFunction, RewardOutput
from egspo.rewards.extraction import extract_answer, has_final_marker, last_boxed
from egspo.rewards.format_reward import FormatReward
from egspo.rewards.math_reward import MathReward
from egspo.rewards.numeric import canonical_number, exact_number
from egspo.rewards.verifier import GoldStatus, VerifierPool, VerifyResult

__all__ = [
    "FormatReward",
    "GoldAudit",
    "GoldStatus",
    "MathReward",
    "RewardFunction",
    "RewardOutput",
    "VerifierPool",
    "VerifyResult",
    "audit_golds",
    "canonical_number",
    "exact_number",
    "extract_answer",
    "has_final_marker",
    "last_boxed",
]
