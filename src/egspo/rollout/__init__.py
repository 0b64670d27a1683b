"""Experience: rollout engines, the experience batch and mini-batching."""

from egspo.rollout.continuous_batching import ContinuousBatchingEngine
from egspo.rollout.engine import Rollout, RolloutEngine, SamplingParams, completion_mask_from_eos
from egspo.rollout.experience import Experience
from egspo.rollout.hf_generate import HFGenerateEngine
from egspo.rollout.shared_prefill import SharedPrefillEngine
from egspo.rollout.vllm_engine import VLLMEngine

__all__ = [
    "ContinuousBatchingEngine",
    "Experience",
    "HFGenerateEngine",
    "Rollout",
    "RolloutEngine",
    "SamplingParams",
    "SharedPrefillEngine",
    "VLLMEngine",
    "completion_mask_from_eos",
]
