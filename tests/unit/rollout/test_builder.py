"""The ExperienceBuilder: DAPO's sample-level techniques (dynamic sampling, overlong filtering, soft
overlong punishment), when it scores old log-probs, and how it corrects an engine whose log-probs
are not the trainer's."""

from __future__ import annotations

import pytest
import torch
from tiny_model import tiny_qwen2

from egspo.config import PromptConfig, RolloutConfig, UpdateConfig
from egspo.data.encoding import PromptEncoder
from egspo.model import PolicyConfig, load_policy
from egspo.rewards import RewardOutput
from egspo.rollout import SharedPrefillEngine
from egspo.rollout.builder import ExperienceBuilder
from egspo.rollout.groups import overlong_penalty

G = 4


class AnswerKeyedReward:
    """Gold "flat": every sample scores 0 (an all-equal group); gold "varied": samples alternate 0/1."""

    def __call__(self, completions: list[str], answers: list[str]) -> RewardOutput:
        rewards = [0.0 if a == "flat" else float(i % 2) for i, a in enumerate(answers)]
        return RewardOutput(rewards=torch.tensor(rewards))


@pytest.fixture(scope="module")
def policy(tiny_tokenizer):
    torch.manual_seed(0)
    return load_policy(PolicyConfig(config=tiny_qwen2(), tokenizer="synthetic"), tiny_tokenizer)


def _builder(policy, tokenizer, **options) -> ExperienceBuilder:
    config = RolloutConfig(
        engine=SharedPrefillEngine(), num_generations=G, max_completion_length=6, **options
    )
    return ExperienceBuilder(
        PromptEncoder(tokenizer, PromptConfig()),
        AnswerKeyedReward(),
        config,
        UpdateConfig(),
        pad_token_id=tokenizer.pad_token_id,
    )


def _refill(answer: str, calls: list[int]):
    def refill(round: int) -> tuple[list[str], list[str]]:
        calls.append(round)
        questions = [f"Refill question {round}.{i} with some words" for i in range(3)]
        return questions, [answer] * 3

    return refill


def test_dynamic_sampling_replaces_all_equal_groups_with_fresh_prompts(policy, tiny_tokenizer):
    builder = _builder(policy, tiny_tokenizer, dynamic_sampling=True, max_num_gen_batches=3)
    calls: list[int] = []
    questions = [
        "Mia has 3 marbles.",
        "A much longer first question with many more words in it.",
        "Leo has 9.",
    ]
    experience, stats = builder.build(
        policy, questions, ["flat", "varied", "flat"], refill=_refill("varied", calls)
    )
    assert calls == [1]  # one refill round brought enough informative prompts
    assert len(experience) == 3 * G  # the batch keeps its size
    grouped = experience.rewards.view(-1, G)
    assert bool((grouped.amax(1) > grouped.amin(1)).all())  # every group carries signal
    assert experience.excluded is None
    assert stats["rollout/all_equal_groups"] == pytest.approx(2 / 3)  # before the refill
    assert stats["rollout/informative_groups"] == 1.0 and stats["rollout/round_cap_hit"] == 0.0
    # rows of different rounds were re-padded into one layout
    assert experience.attention_mask.sum(1).min() > 0
    assert experience.completion_mask.shape[1] == experience.input_ids.shape[1] - experience.prompt_length


def test_dynamic_sampling_caps_its_rounds_and_keeps_filler_groups_out_of_the_loss(policy, tiny_tokenizer):
    builder = _builder(policy, tiny_tokenizer, dynamic_sampling=True, max_num_gen_batches=3)
    calls: list[int] = []
    experience, stats = builder.build(
        policy, ["q one", "q two", "q three"], ["varied", "flat", "flat"], refill=_refill("flat", calls)
    )
    assert calls == [1, 2]  # the cap: 3 rounds in all, logged
    assert stats["rollout/sampling_rounds"] == 3.0 and stats["rollout/round_cap_hit"] == 1.0
    assert experience.excluded.tolist() == [False] * G + [True] * (2 * G)
    assert experience.loss_mask[G:].sum() == 0 and experience.loss_mask[:G].sum() > 0


def test_overlong_filtering_keeps_truncated_samples_out_of_the_loss(policy, tiny_tokenizer):
    builder = _builder(policy, tiny_tokenizer, mask_truncated_completions=True)
    experience, stats = builder.build(policy, ["q one", "q two"], ["varied", "varied"])
    assert experience.truncated.any()  # an untrained model rarely stops within 6 tokens
    excluded = (
        experience.excluded if experience.excluded is not None else torch.zeros(len(experience), dtype=bool)
    )
    assert torch.equal(excluded, experience.truncated)
    assert experience.loss_mask[experience.truncated].sum() == 0
    assert stats["rollout/excluded_samples"] == pytest.approx(experience.truncated.float().mean().item())


def test_soft_overlong_punishment_hand_values():
    lengths = torch.tensor([10, 16, 20, 24, 32])
    penalty = overlong_penalty(lengths, max_length=32, buffer=16, factor=1.0)
    torch.testing.assert_close(penalty, torch.tensor([0.0, 0.0, -0.25, -0.5, -1.0]))
    torch.testing.assert_close(overlong_penalty(lengths, 32, 16, factor=0.5), penalty * 0.5)


@pytest.mark.parametrize("factor", [0.5, 1.0, 2.0])
def test_soft_overlong_punishment_is_floored_at_minus_factor_beyond_the_limit(factor):
    """DAPO's formula is -factor from the limit on: longer never costs more (-1.2 at Lmax + 1 before)."""
    lengths = torch.tensor([33, 40, 64, 128])
    torch.testing.assert_close(overlong_penalty(lengths, 32, 16, factor), torch.full((4,), -factor))


def test_soft_overlong_punishment_enters_the_reward_and_the_advantages(policy, tiny_tokenizer):
    builder = _builder(policy, tiny_tokenizer, overlong_buffer_len=4, overlong_penalty_factor=1.0)
    torch.manual_seed(3)
    experience, stats = builder.build(policy, ["q one", "q two"], ["flat", "flat"])
    lengths = experience.completion_mask.sum(1)
    expected = overlong_penalty(lengths, 6, 4, 1.0)
    torch.testing.assert_close(experience.rewards, expected)  # the verifiable reward is 0 here
    assert stats["reward/overlong_penalty"] == pytest.approx(float(expected.mean()))
    assert experience.correct.sum() == 0  # shaping never changes what counts as correct


class OffsetLogprobs(SharedPrefillEngine):
    """The real engine, reporting every sampled token's log-prob `offset` nats off the trainer's: the
    behaviour of a sampler with other kernels (vLLM), made exact so that the correction can be checked."""

    scores_what_it_samples = False

    def __init__(self, offset: float) -> None:
        super().__init__()
        self.offset = offset

    def generate(self, model, input_ids, attention_mask, params):
        rollout = super().generate(model, input_ids, attention_mask, params)
        rollout.logprobs = (rollout.logprobs - self.offset) * rollout.completion_mask
        rollout.entropy = None  # like vLLM: entropies come from the trainer's scoring pass
        return rollout


@pytest.mark.parametrize("offset", [0.1, 1.0])
def test_a_sampler_whose_logprobs_differ_is_measured_and_corrected(policy, tiny_tokenizer, offset):
    """delta = logp_trainer - log mu = offset on every token: weights min(e^offset, 2), and rows whose
    geometric-mean ratio e^offset leaves [1/1.05, 1.05] are out of the loss."""
    builder = ExperienceBuilder(
        PromptEncoder(tiny_tokenizer, PromptConfig()),
        AnswerKeyedReward(),
        RolloutConfig(engine=OffsetLogprobs(offset), num_generations=G, max_completion_length=6),
        UpdateConfig(),
        pad_token_id=tiny_tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    experience, stats = builder.build(policy, ["What is 1 + 2?", "What is 3 + 4?"], ["varied", "varied"])
    assert experience.old_logprobs is None  # one optimizer step: the update's own log-probs are the old ones
    valid = experience.completion_mask.bool()
    expected = min(torch.tensor(offset).exp().item(), 2.0)
    torch.testing.assert_close(
        experience.is_weights[valid], torch.full_like(experience.is_weights[valid], expected)
    )
    assert bool((experience.is_weights[~valid] == 1).all())
    assert bool(experience.excluded.all())  # e^offset > 1.05: every row is a gross mismatch
    assert stats["mismatch/logprob_abs_diff_mean"] == pytest.approx(offset, abs=1e-5)
    assert stats["mismatch/rs_rejected_frac"] == 1.0


def test_engines_that_score_what_they_sample_get_no_weights(policy, tiny_tokenizer):
    builder = _builder(policy, tiny_tokenizer)
    torch.manual_seed(0)
    experience, stats = builder.build(policy, ["What is 1 + 2?"], ["varied"])
    assert experience.is_weights is None and not any(k.startswith("mismatch/") for k in stats)
