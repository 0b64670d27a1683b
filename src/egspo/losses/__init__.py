"""Policy and SFT losses in pure torch: ``loss(batch) -> LossOutput(loss, metrics)``, minimised."""

from .aggregation import AGG_MODES, AggMode, aggregate, masked_mean
from .base import PolicyLoss
from .batch import LossOutput, TokenBatch
from .cegppo import CEGPPOLoss
from .egspo import EGSPOLoss
from .espo import ESPOLoss
from .gate import EntropyGate
from .kl import KL_ESTIMATORS, KLEstimator, kl_penalty
from .ppo import ClippedObjective, PPOClipLoss, clipped_objective
from .sft import ChordPhiLoss, NLLLoss, SFTLoss

__all__ = [
    "AGG_MODES",
    "KL_ESTIMATORS",
    "AggMode",
    "CEGPPOLoss",
    "ChordPhiLoss",
    "ClippedObjective",
    "EGSPOLoss",
    "ESPOLoss",
    "EntropyGate",
    "KLEstimator",
    "LossOutput",
    "NLLLoss",
    "PPOClipLoss",
    "PolicyLoss",
    "SFTLoss",
    "TokenBatch",
    "aggregate",
    "clipped_objective",
    "kl_penalty",
    "masked_mean",
]
