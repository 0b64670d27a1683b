"""Experience: rollout engines, the experience batch and mini-batching."""

from egspo.rollout.engine import HFGenerateEngine, Rollout, RolloutEngine, completion_mask_from_eos
from egspo.rollout.experience import Experience

__all__ = ["Experience", "HFGenerateEngine", "Rollout", "RolloutEngine", "completion_mask_from_eos"]
