"""Prompts in, experience out: sampling, rewards, advantages and the scoring passes an RL update needs."""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor

from egspo.advantages import group_advantages, indexed_group_advantages
from egspo.distributed import gather_objects
from egspo.losses import masked_mean
from egspo.losses.mismatch import MismatchCorrection, MismatchOutput, rollout_correction
from egspo.methods.base import RLMethod, RolloutContext, check_methods
from egspo.model import stop_token_ids
from egspo.rewards import RewardFunction, RewardOutput
from egspo.rollout.engine import Rollout, SamplingParams
from egspo.rollout.experience import Experience, take_rows
from egspo.rollout.groups import Groups, Refill, constant_groups, dynamic_sampling, overlong_penalty
from egspo.scoring import token_logprobs

if TYPE_CHECKING:
    from egspo.config import RolloutConfig, UpdateConfig
    from egspo.data.encoding import PromptEncoder


class Reference(Protocol):
    """The KL reference policy of a policy, as a context (`egspo.model.KLReference`)."""

    def __call__(self, policy: torch.nn.Module) -> AbstractContextManager[torch.nn.Module]: ...


class ExperienceBuilder:
    """Turns a batch of questions into an `Experience` for one RL iteration.

    In order, every row treated alike:

    1. sample `num_generations` completions per prompt with the engine and reward them; with
       dynamic sampling (DAPO), replace prompts whose samples all scored alike with fresh ones
       until the batch is full or `max_num_gen_batches` rounds are spent;
    2. each method's `extend` (`egspo.methods`: UEC-RL adds hotter samples of hard prompts);
    3. score: token entropies (from the engine when it records them), and, only when the update
       needs them, the old-policy log-probs and the reference log-probs (KL penalty), each row at
       the temperature it was sampled at;
    4. shape the rewards: each method's term (OGER's bonus), then DAPO's soft overlong punishment;
    5. group-relative advantages (over each row's advantage group);
    6. rows out of the loss: dynamic sampling's top-ups, truncated samples (overlong filtering),
       and each method's `exclude`.

    Args:
        encoder: prompt formatting and tokenisation.
        reward: scores decoded completions against gold answers.
        config: sampling, advantage and sample-level options.
        update: the update's options (how many optimizer steps a rollout batch feeds).
        pad_token_id: pads rows.
        methods: the RL-iteration plug-ins, in order.
        reference: the KL reference (None: no KL term).
        logprob_chunk_size: rows per chunk of the fused log-prob op.
    """

    def __init__(
        self,
        encoder: PromptEncoder,
        reward: RewardFunction,
        config: RolloutConfig,
        update: UpdateConfig,
        *,
        pad_token_id: int,
        methods: Sequence[RLMethod] = (),
        reference: Reference | None = None,
    ) -> None:
        problems = check_methods(methods, dynamic_sampling=config.dynamic_sampling)
        if problems:
            raise ValueError("\n".join(problems))
        self.encoder = encoder
        self.reward = reward
        self.config = config
        self.update_config = update
        self.pad_token_id = pad_token_id
        self.methods = list(methods)
        self.reference = reference
        self.prompts_over_length = 0
        self._sampling: SamplingParams | None = None

    def sampling_params(self, policy: torch.nn.Module) -> SamplingParams:
        """The rollout's sampling parameters; stop tokens default to the tokenizer's and the model's EOS."""
        if self._sampling is None:
            c = self.config
            self._sampling = SamplingParams(
                max_new_tokens=c.max_completion_length,
                num_samples=c.num_generations,
                temperature=c.temperature,
                top_p=c.top_p,
                top_k=c.top_k,
                stop_token_ids=tuple(c.stop_token_ids or stop_token_ids(self.encoder.tokenizer, policy)),
                pad_token_id=self.pad_token_id,
            )
        return self._sampling

    def needs_old_logprobs(self, rows: int) -> bool:
        """Whether a rollout batch of `rows` sequences is scored under the rollout policy now.

        Needed when the update takes more than one optimizer step on it (`ppo_epochs > 1` or
        several mini-batches: later steps need the rollout policy's log-probs) or a method stores
        them (UEC-RL's replay buffer). With a single step the rollout policy is the current one and
        the update uses its own log-probs, detached (ratio exactly 1).
        """
        several_steps = (
            self.update_config.ppo_epochs > 1 or (self.update_config.mini_batch_size or rows) < rows
        )
        return several_steps or any(m.needs_behaviour_logprobs for m in self.methods)

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

        `rl_iteration` (RL iterations completed) drives the methods' schedules; `teachers` maps a
        question to its expert responses (the offline trajectories OGER measures divergence from).
        """
        device = next(policy.parameters()).device
        g = self.config.num_generations
        params = self.sampling_params(policy)
        t0, sample = clock(device), partial(self.sample, policy)
        groups = sample(questions, answers)
        stats = {"rollout/all_equal_groups": constant_groups(groups.rewards, g).float().mean().item()}
        if self.config.dynamic_sampling:
            rounds, pad = self.config.max_num_gen_batches, self.pad_token_id
            groups, groups.excluded, dynamic = dynamic_sampling(sample, groups, refill, g, rounds, pad)
            stats.update(dynamic)
        for method in self.methods:
            groups = method.extend(groups, sample, stats, params=params, group_size=g)
        t1 = clock(device)
        logprobs, entropy, ref_logprobs = self._score(policy, groups)
        mismatch = mismatch_correction(groups.rollout, logprobs, self.config.mismatch_correction, stats)
        context = RolloutContext(policy, self.encoder.tokenizer, rl_iteration, g, teachers or {})
        rewards = self._shaped_rewards(groups, entropy, context, stats)
        if groups.group is None:
            advantages = group_advantages(rewards, g, scale=self.config.advantage_scale)
        else:
            advantages = indexed_group_advantages(rewards, groups.group, scale=self.config.advantage_scale)
        excluded = self._excluded(groups, advantages, None if mismatch is None else mismatch.rejected)
        rollout = groups.rollout
        experience = Experience(
            input_ids=rollout.input_ids,
            attention_mask=rollout.attention_mask,
            completion_mask=rollout.completion_mask.float(),
            entropy=entropy,
            advantages=advantages,
            rewards=rewards,
            truncated=rollout.truncated,
            prompt_length=rollout.prompt_length,
            old_logprobs=logprobs if self.needs_old_logprobs(len(groups)) else None,
            ref_logprobs=ref_logprobs,
            correct=groups.correct,
            excluded=excluded if bool(excluded.any()) else None,
            temperature=groups.temperature,
            completions=groups.completions,
            is_weights=None if mismatch is None else mismatch.is_weights,
        )
        stats.update(groups.metrics)
        stats.update(rollout_statistics(groups, rewards, entropy, excluded))
        stats["data/prompts_over_length_total"] = float(self.prompts_over_length)
        stats["time/generation"], stats["time/scoring"] = t1 - t0, clock(device) - t1
        return experience, stats

    def _excluded(self, groups: Groups, advantages: Tensor, rejected: Tensor | None) -> Tensor:
        """`[N]` bool, the rows out of the loss: dynamic sampling's top-ups, truncated samples with
        overlong filtering, rows the mismatch correction rejects, and each method's exclusions;
        every row judged alike."""
        excluded = torch.zeros_like(groups.correct) if groups.excluded is None else groups.excluded
        if rejected is not None:
            excluded = excluded | rejected
        if self.config.mask_truncated_completions:
            excluded = excluded | groups.rollout.truncated
        for method in self.methods:
            dropped = method.exclude(groups, advantages)
            excluded = excluded if dropped is None else excluded | dropped
        return excluded

    def _shaped_rewards(
        self, groups: Groups, entropy: Tensor, context: RolloutContext, stats: dict[str, float]
    ) -> Tensor:
        """The verifiable reward plus each method's term, then DAPO's soft overlong punishment."""
        rewards = groups.rewards
        for method in self.methods:
            term, metrics = method.shape_rewards(groups, entropy, context)
            if term is not None:
                rewards = rewards + term
            stats.update(metrics)
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
        params = params or self.sampling_params(policy)
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

    def _score(self, policy: torch.nn.Module, groups: Groups) -> tuple[Tensor | None, Tensor, Tensor | None]:
        """Trainer log-probs (when needed or free), token entropies, reference log-probs (when
        needed), each row at the temperature it was sampled at."""
        score = partial(
            score_rollout, policy, old=self.needs_old_logprobs(len(groups)), reference=self.reference,
            chunk_size=self.update_config.logprob_chunk_size,
        )  # fmt: skip
        rollout, temperatures = groups.rollout, groups.temperature
        if temperatures is None or len(temperatures.unique()) == 1:
            return score(rollout, self.config.temperature if temperatures is None else float(temperatures[0]))
        scores: list[Tensor | None] = [
            None,
            torch.zeros_like(rollout.completion_mask, dtype=torch.float32),
            None,
        ]
        for t in temperatures.unique():
            rows = (temperatures == t).nonzero().flatten()
            for k, part in enumerate(score(take_rows(rollout, rows), float(t))):
                if part is not None:
                    scores[k] = torch.zeros_like(scores[1]) if scores[k] is None else scores[k]
                    scores[k][rows] = part.float()
        return scores[0], scores[1], scores[2]

    def state_dict(self) -> dict[str, Any]:
        return {"prompts_over_length": self.prompts_over_length}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.prompts_over_length = int(state["prompts_over_length"])


def score_rollout(
    policy: torch.nn.Module,
    rollout: Rollout,
    temperature: float,
    *,
    old: bool,
    reference: Reference | None,
    chunk_size: int | None,
) -> tuple[Tensor | None, Tensor, Tensor | None]:
    """`[N, C]` trainer log-probs, entropies and reference log-probs (with a `reference`) of the
    rollout's completion tokens under `softmax(logits / temperature)`. The log-probs are scored when
    `old` asks for them or the engine recorded no entropies (which then come out of the same pass;
    else they are the engine's), and are None otherwise."""
    p = rollout.prompt_length
    score_mask = torch.cat(
        [rollout.completion_mask.new_zeros(rollout.input_ids.shape[0], p), rollout.completion_mask], dim=1
    )

    def score(model: torch.nn.Module) -> tuple[Tensor, Tensor]:
        scores = token_logprobs(
            model, rollout.input_ids, rollout.attention_mask, score_mask, temperature=temperature,
            chunk_size=chunk_size,
        )  # fmt: skip
        return scores[0][:, p:], scores[1][:, p:]

    logprobs = entropy = ref_logprobs = None
    if old or rollout.entropy is None:
        logprobs, entropy = score(policy)
    if rollout.entropy is not None:
        entropy = rollout.entropy.float()
    if reference is not None:
        with reference(policy) as model:
            ref_logprobs = score(model)[0]
    return logprobs, entropy, ref_logprobs


def mismatch_correction(
    rollout: Rollout, logprobs: Tensor | None, config: MismatchCorrection, stats: dict[str, float]
) -> MismatchOutput | None:
    """The gap between the engine's recorded log-probs and the trainer's `logprobs`, and its
    correction (`model.rollout.mismatch_correction`); None when either is unknown. The metrics go
    into `stats` (`_max`: the maximum over every process)."""
    if rollout.logprobs is None or logprobs is None:
        return None
    out = rollout_correction(logprobs, rollout.logprobs, rollout.completion_mask, config)
    for key, value in out.metrics.items():
        stats[key] = max(gather_objects(float(value))) if key.endswith("_max") else float(value)
    return out


def rollout_statistics(
    groups: Groups, rewards: Tensor, entropy: Tensor, excluded: Tensor
) -> dict[str, float]:
    """What the logs show of a rollout batch, over its regular rows (not the rows a method added)."""
    rollout = groups.rollout
    rows = slice(None) if groups.added is None else ~groups.added
    mask = rollout.completion_mask[rows]
    return {
        "reward": float(rewards[rows].mean()),
        "entropy": float(masked_mean(entropy[rows], mask)),
        "train/accuracy": float(groups.correct[rows].float().mean()),
        "train/response_length": float(mask.sum(1).float().mean()),
        "train/truncation_rate": float(rollout.truncated[rows].float().mean()),
        "rollout/excluded_samples": float(excluded.float().mean()),
        "data/prompts_over_length": float(groups.prompts_over_length),
    }


def correctness(out: RewardOutput) -> Tensor:
    """Per-sample correctness: the reward's own verdict, else a full reward."""
    return out.correct if out.correct is not None else out.rewards >= 1.0


def clock(device: torch.device) -> float:
    """Seconds, after the device has finished its queued work (timings of GPU steps are real)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
