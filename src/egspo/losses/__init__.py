"""Policy and SFT losses in pure torch: ``loss(batch) -> LossOutput(loss, metrics)``, minimised."""

from .aggregation import AGG_MODES, AggMode, aggregate, aggregation_units, masked_mean
from .base import PolicyLoss
from .batch import LossOutput, TokenBatch
from .cegppo import CEGPPOLoss
from .cispo import CISPOLoss
from .cov import ClipCovLoss, CovariancePolicyLoss, KLCovLoss
from .egspo import EGSPOLoss
from .espo import ESPOLoss, group_token_log_ratio
from .gate import EntropyGate, HasEntropyGate
from .gspo import GSPOLoss
from .kl import KL_ESTIMATORS, KLEstimator, kl_penalty
from .mismatch import (
    MismatchCorrection,
    MismatchOutput,
    default_correction,
    mismatch_metrics,
    rollout_correction,
)
from .papo import PAPOLoss
from .ppo import ClippedObjective, ClippedPolicyLoss, PPOClipLoss, clipped_objective
from .sft import ChordPhiLoss, NLLLoss, SFTLoss

__all__ = [
    "AGG_MODES",
    "KL_ESTIMATORS",
    "AggMode",
    "CEGPPOLoss",
    "CISPOLoss",
    "ChordPhiLoss",
    "ClipCovLoss",
    "ClippedObjective",
    "ClippedPolicyLoss",
    "CovariancePolicyLoss",
    "EGSPOLoss",
    "ESPOLoss",
    "EntropyGate",
    "GSPOLoss",
    "HasEntropyGate",
    "KLCovLoss",
    "KLEstimator",
    "LossOutput",
    "MismatchCorrection",
    "MismatchOutput",
    "NLLLoss",
    "PAPOLoss",
    "PPOClipLoss",
    "PolicyLoss",
    "SFTLoss",
    "TokenBatch",
    "aggregate",
    "aggregation_units",
    "clipped_objective",
    "default_correction",
    "group_token_log_ratio",
    "kl_penalty",
    "masked_mean",
    "mismatch_metrics",
    "rollout_correction",
]
