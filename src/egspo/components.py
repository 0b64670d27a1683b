"""The plain components of a run, built once its policy is loaded (`HybridRLModule.configure_model`).

Each runs without a Trainer; the module only composes them: the experience builder (sampling,
rewards, advantages, scoring), the evaluator, the KL reference and UEC-RL's replay stabiliser.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from egspo.config import EvalConfig, RolloutConfig, UpdateConfig
from egspo.data.encoding import PromptEncoder
from egspo.evaluation import Evaluator
from egspo.losses import PolicyLoss
from egspo.model import kl_reference, stop_token_ids
from egspo.rewards import RewardFunction
from egspo.rewards.oger import OGERBonus
from egspo.rollout.builder import ExperienceBuilder
from egspo.rollout.exploration import UECConfig
from egspo.rollout.replay import ReplayStabiliser

Reference = Callable[[torch.nn.Module], AbstractContextManager[torch.nn.Module]]


@dataclass
class RunComponents:
    """What the module composes around its policy."""

    experience_builder: ExperienceBuilder
    evaluator: Evaluator
    reference: Reference | None  # the KL reference, when the loss has a KL term
    replay: ReplayStabiliser | None  # UEC-RL's stabiliser, when it has a replay buffer


def build_components(
    policy: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    encoder: PromptEncoder,
    reward: RewardFunction,
    *,
    rollout: RolloutConfig,
    update: UpdateConfig,
    evaluation: EvalConfig,
    policy_loss: PolicyLoss,
    exploration_bonus: OGERBonus | None = None,
    uec: UECConfig | None = None,
) -> RunComponents:
    """The run's components for `policy`; stop tokens default to the tokenizer's and the model's EOS."""
    stops = rollout.stop_token_ids or stop_token_ids(tokenizer, policy)
    pad = tokenizer.pad_token_id
    replay = uec is not None and uec.replay_capacity > 0
    reference = kl_reference(policy) if policy_loss.beta > 0 else None
    builder = ExperienceBuilder(
        encoder,
        reward,
        rollout,
        stop_token_ids=stops,
        pad_token_id=pad,
        # The replay buffer keeps behaviour log-probs, so a replayed row has its importance ratio.
        score_old=lambda n: replay or update.needs_old_logprobs(n),
        reference=reference,
        logprob_chunk_size=update.logprob_chunk_size,
        exploration_bonus=exploration_bonus,
        uec=uec,
    )
    evaluator = Evaluator(encoder, reward, evaluation, rollout, stop_token_ids=stops, pad_token_id=pad)
    return RunComponents(builder, evaluator, reference, ReplayStabiliser(uec, pad) if replay else None)
