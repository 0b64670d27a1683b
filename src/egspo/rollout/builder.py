"""Prompts in, experience out: sampling, rewards, advantages and the scoring passes an RL update needs."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from egspo.advantages import group_advantages
from egspo.losses import masked_mean
from egspo.rewards import RewardFunction, RewardOutput
from egspo.rollout.engine import Rollout, SamplingParams
from egspo.rollout.experience import Experience
from egspo.scoring import token_logprobs

if TYPE_CHECKING:
    from egspo.config import RolloutConfig
    from egspo.data.encoding import PromptEncoder


class ExperienceBuilder:
    """Turns a batch of questions into an `Experience` for one RL iteration.

    In order: encode the prompts; sample `num_generations` completions per prompt with the
    engine; decode and reward them; group-relative advantages; then, only when the update
    needs them, the old-policy log-probs (off-policy updates) and the reference log-probs
    (KL penalty). Token entropies come from the engine, which records them while sampling;
    an engine that does not gets them from the old-policy scoring pass.

    Args:
        encoder: prompt formatting and tokenisation.
        reward: scores decoded completions against gold answers.
        config: sampling and advantage options.
        stop_token_ids, pad_token_id: what ends a sample and pads a row.
        score_old: whether a rollout batch of this many sequences needs old log-probs (the update
            makes several optimizer steps on it).
        reference: a context in which the policy acts as the KL reference (None: no KL term).
        logprob_chunk_size: rows per chunk of the fused log-prob op.
    """

    def __init__(
        self,
        encoder: PromptEncoder,
        reward: RewardFunction,
        config: RolloutConfig,
        *,
        stop_token_ids: list[int],
        pad_token_id: int,
        score_old: Callable[[int], bool] = lambda rollout_batch: False,
        reference: Callable[[torch.nn.Module], AbstractContextManager] | None = None,
        logprob_chunk_size: int | None = None,
    ) -> None:
        self.encoder = encoder
        self.reward = reward
        self.config = config
        self.score_old = score_old
        self.reference = reference
        self.logprob_chunk_size = logprob_chunk_size
        self.sampling = SamplingParams(
            max_new_tokens=config.max_completion_length,
            num_samples=config.num_generations,
            temperature=config.temperature,
            top_p=config.top_p,
            top_k=config.top_k,
            stop_token_ids=tuple(stop_token_ids),
            pad_token_id=pad_token_id,
        )
        self.prompts_over_length = 0

    @torch.no_grad()
    def build(
        self, policy: torch.nn.Module, questions: list[str], answers: list[str]
    ) -> tuple[Experience, dict[str, float]]:
        """The experience of `questions` and its statistics (rewards, data counts, time split)."""
        device = next(policy.parameters()).device
        t0 = clock(device)
        prompts = self.encoder.prompts(questions, device)
        if prompts.over_length and not self.prompts_over_length:
            warnings.warn(
                f"{prompts.over_length} of {len(questions)} prompts exceed model.prompt.max_prompt_length="
                f"{self.encoder.config.max_prompt_length} tokens and lose their beginning; counted in "
                "data/prompts_over_length(_total)",
                stacklevel=2,
            )
        self.prompts_over_length += prompts.over_length
        rollout = self.config.engine.generate(
            policy, prompts.input_ids, prompts.attention_mask, self.sampling
        )
        t1 = clock(device)
        completions = self.encoder.tokenizer.batch_decode(rollout.completion_ids, skip_special_tokens=True)
        repeated = [a for a in answers for _ in range(self.config.num_generations)]
        rewarded = self.reward(completions, repeated)
        rewards = rewarded.rewards.to(device, torch.float32)
        advantages = group_advantages(rewards, self.config.num_generations, scale=self.config.advantage_scale)
        t2 = clock(device)
        old_logprobs, entropy, ref_logprobs = self._score(policy, rollout)
        t3 = clock(device)
        experience = Experience(
            input_ids=rollout.input_ids,
            attention_mask=rollout.attention_mask,
            completion_mask=rollout.completion_mask.float(),
            entropy=entropy,
            advantages=advantages,
            rewards=rewards,
            truncated=rollout.truncated,
            prompt_length=rollout.prompt_length,
            old_logprobs=old_logprobs,
            ref_logprobs=ref_logprobs,
            correct=correctness(rewarded).to(device),
            completions=completions,
        )
        stats = {k: float(v) for k, v in rewarded.metrics.items()}
        lengths = experience.completion_mask.sum(1)
        stats.update(
            {
                "reward": float(rewards.mean()),
                "entropy": float(masked_mean(experience.entropy, experience.completion_mask)),
                "train/accuracy": float(experience.correct.float().mean()),
                "train/response_length": float(lengths.float().mean()),
                "train/truncation_rate": float(experience.truncated.float().mean()),
                "data/prompts_over_length": float(prompts.over_length),
                "data/prompts_over_length_total": float(self.prompts_over_length),
                "time/generation": t1 - t0,
                "time/reward": t2 - t1,
                "time/scoring": t3 - t2,
            }
        )
        return experience, stats

    def _score(
        self, policy: torch.nn.Module, rollout: Rollout
    ) -> tuple[Tensor | None, Tensor, Tensor | None]:
        """Old log-probs (when needed), token entropies, reference log-probs (when needed)."""
        p = rollout.prompt_length
        score_mask = torch.cat(
            [rollout.completion_mask.new_zeros(rollout.input_ids.shape[0], p), rollout.completion_mask], dim=1
        )

        def score() -> tuple[Tensor, Tensor]:
            scores = token_logprobs(
                policy,
                rollout.input_ids,
                rollout.attention_mask,
                score_mask,
                temperature=self.config.temperature,
                chunk_size=self.logprob_chunk_size,
            )
            return scores[0][:, p:], scores[1][:, p:]

        old_logprobs = entropy = ref_logprobs = None
        score_old = self.score_old(rollout.input_ids.shape[0])
        if score_old or rollout.entropy is None:
            logprobs, entropy = score()
            old_logprobs = logprobs if score_old else None
        if rollout.entropy is not None:
            entropy = rollout.entropy.float()
        if self.reference is not None:
            with self.reference(policy):
                ref_logprobs = score()[0]
        return old_logprobs, entropy, ref_logprobs


def correctness(out: RewardOutput) -> Tensor:
    """Per-sample correctness: the reward's own verdict, else a full reward."""
    return out.correct if out.correct is not None else out.rewards >= 1.0


def clock(device: torch.device) -> float:
    """Seconds, after the device has finished its queued work (timings of GPU steps are real)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
