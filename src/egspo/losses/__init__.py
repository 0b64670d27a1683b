"""Policy and SFT losses in pure torch: ``loss(batch) -> LossOutput(loss, metrics)``, minimised."""

from .aggregation import AGG_MODES, AggMode, aggregate, aggregation_units, masked_mean
from .base import PolicyLoss
from .batch import LossOutput, TokenBatch
from .cegppo import CEGPPOLoss
from .egspo import EGSPOLoss
from .espo import ESPOLoss
from .gate import EntropyGate, HasEntropyGate
from .kl import KL_ESTIMATORS, KLEstimator, kl_penalty
from .papo import PAPOLoss
from .ppo import ClippedObjective, ClippedPolicyLoss, PPOClipLoss, clipped_objective
from .sft import ChordPhiLoss, NLLLoss, SFTLoss

__all__ = [
    "AGG_MODES",
    "KL_ESTIMATORS",
    "AggMode",
    "CEGPPOLoss",
    "ChordPhiLoss",
    "ClippedObjective",
    "ClippedPolicyLoss",
    "EGSPOLoss",
    "ESPOLoss",
    "EntropyGate",
    "HasEntropyGate",
    "KLEstimator",
    "LossOutput",
    "NLLLoss",
    "PAPOLoss",
    "PPOClipLoss",
    "PolicyLoss",
    "SFTLoss",
    "TokenBatch",
    "aggregate",
    "aggregation_units",
    "clipped_objective",
    "kl_penalty",
    "masked_mean",
]
