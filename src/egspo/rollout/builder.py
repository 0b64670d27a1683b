"""Prompts in, experience out: sampling, rewards, advantages and the scoring passes an RL update needs."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import replace
from functools import partial
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from egspo.advantages import group_advantages
from egspo.losses import masked_mean
from egspo.rewards import RewardFunction, RewardOutput
from egspo.rewards.oger import OGERBonus, embed_rollouts_and_teachers
from egspo.rollout.engine import Rollout, SamplingParams
from egspo.rollout.experience import Experience
from egspo.rollout.exploration import UECConfig
from egspo.rollout.groups import Groups, Refill, constant_groups, dynamic_sampling, overlong_penalty
from egspo.rollout.uec_step import explore_hard_prompts
from egspo.scoring import token_logprobs

if TYPE_CHECKING:
    from egspo.config import RolloutConfig
    from egspo.data.encoding import PromptEncoder


class ExperienceBuilder:
    """Turns a batch of questions into an `Experience` for one RL iteration.

    In order: sample `num_generations` completions per prompt with the engine and reward them;
    with dynamic sampling (DAPO), replace prompts whose samples all scored alike with fresh ones
    until the batch is full or `max_num_gen_batches` rounds are spent; shape the rewards (soft
    overlong punishment); group-relative advantages; mark truncated samples out of the loss
    (overlong filtering); then, only when the update needs them, the old-policy log-probs
    (off-policy updates) and the reference log-probs (KL penalty). Token entropies come from the
    engine, which records them while sampling; an engine that does not gets them from a scoring pass.

    Args:
        encoder: prompt formatting and tokenisation.
        reward: scores decoded completions against gold answers.
        config: sampling, advantage and sample-level options.
        stop_token_ids, pad_token_id: what ends a sample and pads a row.
        score_old: whether a rollout batch of this many sequences needs old log-probs (the update
            makes several optimizer steps on it).
        reference: a context that yields the KL reference model for a policy (None: no KL term).
        logprob_chunk_size: rows per chunk of the fused log-prob op.
        exploration_bonus: OGER's bonus, added to the verifiable reward of correct samples.
        uec: UEC-RL's targeted exploration of hard prompts (`egspo.rollout.exploration.UECConfig`).
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
        reference: Callable[[torch.nn.Module], AbstractContextManager[torch.nn.Module]] | None = None,
        logprob_chunk_size: int | None = None,
        exploration_bonus: OGERBonus | None = None,
        uec: UECConfig | None = None,
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
        if uec is not None and config.dynamic_sampling:
            raise ValueError(
                "model.uec: UEC-RL explores the prompts whose samples all failed, which dynamic sampling "
                "(model.rollout.dynamic_sampling) drops: use one of them"
            )
        self.exploration_bonus = exploration_bonus
        self.uec = uec
        self.exploration = (
            None
            if uec is None
            else replace(
                self.sampling,
                temperature=uec.exploration_temperature,
                num_samples=uec.exploration_samples or config.num_generations,
            )
        )
        self.prompts_over_length = 0

    @torch.no_grad()
    def build(
        self,
        policy: torch.nn.Module,
        questions: list[str],
        answers: list[str],
        refill: Refill | None = None,
        *,
        rl_iteration: int = 0,
        teachers: Mapping[str, Sequence[str]] | None = None,
    ) -> tuple[Experience, dict[str, float]]:
        """The experience of `questions` (and of refills, with dynamic sampling) and its statistics.

        `rl_iteration` drives the exploration bonus's schedule; `teachers` maps a question to its
        expert responses (the offline trajectories the bonus measures divergence from).
        """
        device = next(policy.parameters()).device
        g = self.config.num_generations
        t0 = clock(device)
        groups = self.sample(policy, questions, answers)
        stats = {"rollout/all_equal_groups": constant_groups(groups.rewards, g).float().mean().item()}
        excluded = torch.zeros_like(groups.correct)
        if self.config.dynamic_sampling:
            sample = partial(self.sample, policy)
            groups, excluded, dynamic = dynamic_sampling(
                sample, groups, refill, g, self.config.max_num_gen_batches, self.sampling.pad_token_id
            )
            stats.update(dynamic)
        t1 = clock(device)
        rollout = groups.rollout
        old_logprobs, entropy, ref_logprobs = self._score(policy, rollout, self.config.temperature)
        rewards = self._shaped_rewards(policy, groups, entropy, rl_iteration, teachers or {}, stats)
        if self.config.mask_truncated_completions:
            excluded = excluded | rollout.truncated
        advantages = group_advantages(rewards, g, scale=self.config.advantage_scale)
        experience = _experience(groups, (old_logprobs, entropy, ref_logprobs), rewards, advantages, excluded)
        if self.uec is not None:

            def to_experience(explored: Groups, temperature: float, advantages: Tensor, excluded: Tensor):
                old, entropy, ref = self._score(policy, explored.rollout, temperature)
                old = old if experience.old_logprobs is not None else None
                return _experience(explored, (old, entropy, ref), explored.rewards, advantages, excluded)

            experience = explore_hard_prompts(
                groups, experience, uec=self.uec, params=self.exploration, group_size=g,
                temperature=self.config.temperature, scale=self.config.advantage_scale,
                sample=partial(self.sample, policy), to_experience=to_experience, stats=stats,
            )  # fmt: skip
        if not bool(experience.excluded.any()):
            experience.excluded = None
        t2 = clock(device)
        lengths = rollout.completion_mask.sum(1)
        stats.update(groups.metrics)
        stats.update(
            {
                "reward": float(rewards.mean()),
                "entropy": float(masked_mean(entropy, rollout.completion_mask)),
                "train/accuracy": float(groups.correct.float().mean()),
                "train/response_length": float(lengths.float().mean()),
                "train/truncation_rate": float(rollout.truncated.float().mean()),
                "rollout/excluded_samples": float(excluded.float().mean()),
                "data/prompts_over_length": float(groups.prompts_over_length),
                "data/prompts_over_length_total": float(self.prompts_over_length),
                "time/generation": t1 - t0,
                "time/scoring": t2 - t1,
            }
        )
        return experience, stats

    def _shaped_rewards(
        self,
        policy: torch.nn.Module,
        groups: Groups,
        entropy: Tensor,
        rl_iteration: int,
        teachers: Mapping[str, Sequence[str]],
        stats: dict[str, float],
    ) -> Tensor:
        """The verifiable reward plus the exploration bonus (OGER) and the soft overlong punishment."""
        rewards = groups.rewards
        if self.exploration_bonus is not None:
            rollout = groups.rollout
            prompts = groups.questions[:: self.config.num_generations]
            pooled, teacher = embed_rollouts_and_teachers(
                policy, self.encoder.tokenizer, rollout, [list(teachers.get(q, ())) for q in prompts]
            )
            bonus, bonus_stats = self.exploration_bonus(
                pooled,
                teacher,
                entropy=entropy,
                mask=rollout.completion_mask,
                rewards=rewards,
                correct=groups.correct,
                group_size=self.config.num_generations,
                rl_iteration=rl_iteration,
            )
            rewards = rewards + bonus
            stats.update(bonus_stats)
        if self.config.overlong_buffer_len:
            lengths = groups.rollout.completion_mask.sum(1)
            penalty = overlong_penalty(
                lengths, self.config.max_completion_length, self.config.overlong_buffer_len,
                self.config.overlong_penalty_factor,
            )  # fmt: skip
            rewards = rewards + penalty
            stats["reward/overlong_penalty"] = float(penalty.mean())
        return rewards

    def sample(
        self,
        policy: torch.nn.Module,
        questions: list[str],
        answers: list[str],
        params: SamplingParams | None = None,
    ) -> Groups:
        """Rewarded samples of every question, `params.num_samples` each (default: the rollout's settings)."""
        params = params or self.sampling
        device = next(policy.parameters()).device
        prompts = self.encoder.prompts(questions, device)
        if prompts.over_length and not self.prompts_over_length:
            warnings.warn(
                f"{prompts.over_length} of {len(questions)} prompts exceed model.prompt.max_prompt_length="
                f"{self.encoder.config.max_prompt_length} tokens and lose their beginning; counted in "
                "data/prompts_over_length(_total)",
                stacklevel=3,
            )
        self.prompts_over_length += prompts.over_length
        rollout = self.config.engine.generate(policy, prompts.input_ids, prompts.attention_mask, params)
        completions = self.encoder.tokenizer.batch_decode(rollout.completion_ids, skip_special_tokens=True)
        repeated = [a for a in answers for _ in range(params.num_samples)]
        start = time.perf_counter()
        rewarded = self.reward(completions, repeated)
        metrics = {k: float(v) for k, v in rewarded.metrics.items()}
        metrics["time/reward"] = time.perf_counter() - start
        return Groups(
            rollout=rollout,
            questions=[q for q in questions for _ in range(params.num_samples)],
            answers=repeated,
            completions=completions,
            rewards=rewarded.rewards.to(device, torch.float32),
            correct=correctness(rewarded).to(device),
            metrics=metrics,
            prompts_over_length=prompts.over_length,
        )

    def _score(
        self, policy: torch.nn.Module, rollout: Rollout, temperature: float
    ) -> tuple[Tensor | None, Tensor, Tensor | None]:
        """Old log-probs (when needed), token entropies, reference log-probs (when needed), all at
        the `temperature` the rollout was sampled at."""
        p = rollout.prompt_length
        score_mask = torch.cat(
            [rollout.completion_mask.new_zeros(rollout.input_ids.shape[0], p), rollout.completion_mask], dim=1
        )

        def score(model: torch.nn.Module = policy) -> tuple[Tensor, Tensor]:
            scores = token_logprobs(
                model,
                rollout.input_ids,
                rollout.attention_mask,
                score_mask,
                temperature=temperature,
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
            with self.reference(policy) as reference:
                ref_logprobs = score(reference)[0]
        return old_logprobs, entropy, ref_logprobs


def _experience(
    groups: Groups, scores: tuple[Tensor | None, Tensor, Tensor | None], rewards: Tensor, advantages: Tensor,
    excluded: Tensor,
) -> Experience:  # fmt: skip
    """The experience of sampled groups, given their (old log-probs, entropies, reference log-probs)."""
    rollout = groups.rollout
    old_logprobs, entropy, ref_logprobs = scores
    return Experience(
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
        correct=groups.correct,
        excluded=excluded,
        completions=groups.completions,
    )


def correctness(out: RewardOutput) -> Tensor:
    """Per-sample correctness: the reward's own verdict, else a full reward."""
    return out.correct if out.correct is not None else out.rewards >= 1.0


def clock(device: torch.device) -> float:
    """Seconds, after the device has finished its queued work (timings of GPU steps are real)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
