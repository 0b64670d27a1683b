"""The plain components without a Trainer: one RL iteration end to end, and exact micro-batching."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_model import tiny_qwen2

from egspo.config import PromptConfig, RolloutConfig, UpdateConfig
from egspo.data.encoding import PromptEncoder
from egspo.losses import (
    AGG_MODES,
    ChordPhiLoss,
    ClipCovLoss,
    EGSPOLoss,
    ESPOLoss,
    KLCovLoss,
    NLLLoss,
    PPOClipLoss,
)
from egspo.model import PolicyConfig, load_policy
from egspo.rewards import RewardOutput
from egspo.rollout.builder import ExperienceBuilder
from egspo.update import PolicyUpdate

QUESTIONS = ["Mia has 3 marbles. She finds 4 more. How many?", "Leo has 9 coins. He loses 2. How many?"]


class LengthReward:
    """Longer answers score higher: varied rewards within every group of a random model."""

    def __call__(self, completions: list[str], answers: list[str]) -> RewardOutput:
        return RewardOutput(rewards=torch.tensor([min(len(c), 20) / 20 for c in completions]))


@pytest.fixture(scope="module")
def parts(tiny_tokenizer):
    torch.manual_seed(0)
    policy = load_policy(PolicyConfig(config=tiny_qwen2(), tokenizer="synthetic"), tiny_tokenizer)
    encoder = PromptEncoder(tiny_tokenizer, PromptConfig(max_prompt_length=64))
    rollout = RolloutConfig(num_generations=4, max_completion_length=10)
    builder = ExperienceBuilder(
        encoder,
        LengthReward(),
        rollout,
        UpdateConfig(ppo_epochs=2),
        pad_token_id=tiny_tokenizer.pad_token_id,
    )
    torch.manual_seed(1)
    experience, stats = builder.build(policy, QUESTIONS, ["7", "7"])
    demonstrations = encoder.demonstrations(QUESTIONS, ["3 + 4 = 7\n#### 7", "9 - 2 = 7\n#### 7"])
    return policy, experience, stats, demonstrations


def test_one_rl_iteration_from_the_plain_components(parts):
    policy, experience, stats, _ = parts
    policy = copy.deepcopy(policy)
    assert len(experience) == 8 and experience.old_logprobs is not None
    assert experience.advantages.abs().sum() > 0
    assert {"time/generation", "time/reward", "time/scoring"} <= set(stats)
    loss = EGSPOLoss()
    loss.setup(vocab_size=policy.config.vocab_size, max_completion_length=10)
    update = PolicyUpdate(
        loss, NLLLoss(), NLLLoss(), UpdateConfig(mini_batch_size=4, ppo_epochs=2), temperature=1.0
    )
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.1)
    before = [p.detach().clone() for p in policy.parameters()]
    threshold = loss.prepare(experience.entropy[experience.loss_mask.bool()])
    steps = update.rl_update(policy, optimizer, experience, threshold=threshold)
    assert len(steps) == 4  # 2 epochs x 2 mini-batches, metrics for every step
    assert all(s["gate_threshold"] == pytest.approx(float(threshold)) for s in steps)
    assert all(torch.isfinite(torch.tensor(s["loss"])) for s in steps)
    assert any(not torch.equal(a, b) for a, b in zip(before, policy.parameters(), strict=True))
    assert steps[0]["ratio_mean"] == pytest.approx(1.0, abs=1e-5)  # first step: still the rollout policy


def test_extra_rows_keep_the_configured_number_of_steps(parts):
    """UEC-RL joins samples of hard prompts to the batch: 10 rows at mini_batch_size 4 are 2 steps."""
    policy, experience, _, _ = parts
    policy = copy.deepcopy(policy)
    joined = experience.select(torch.cat([torch.arange(8), torch.arange(2)]))
    loss = PPOClipLoss()
    loss.setup(vocab_size=policy.config.vocab_size, max_completion_length=10)
    update = PolicyUpdate(loss, NLLLoss(), NLLLoss(), UpdateConfig(mini_batch_size=4), temperature=1.0)
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.1)
    steps = update.rl_update(policy, optimizer, joined, threshold=None)
    assert len(steps) == 2
    assert all(torch.isfinite(torch.tensor(s["loss"])) for s in steps)


def _update_delta(policy, loss, experience, threshold, budget, *, mu=0.0, demonstrations=None, mix=None):
    """Weight change of one SGD step (lr 1): minus the accumulated gradient."""
    policy = copy.deepcopy(policy)
    config = UpdateConfig(ppo_max_token_len_per_gpu=budget, max_grad_norm=None)
    update = PolicyUpdate(loss, NLLLoss(), mix or NLLLoss(), config, temperature=1.0)
    before = [p.detach().clone() for p in policy.parameters()]
    steps = update.rl_update(
        policy,
        torch.optim.SGD(policy.parameters(), lr=1.0),
        experience,
        threshold=threshold,
        mu=mu,
        demonstrations=demonstrations,
    )
    return [p.detach() - b for p, b in zip(policy.parameters(), before, strict=True)], steps[0]["loss"]


LOSSES = [
    *[
        pytest.param(lambda mode=mode: PPOClipLoss(loss_agg_mode=mode), id=f"ppo-{mode}")
        for mode in AGG_MODES
    ],
    pytest.param(lambda: EGSPOLoss(), id="egspo"),
    pytest.param(lambda: ESPOLoss(), id="espo"),
    pytest.param(lambda: PPOClipLoss(beta=0.1), id="ppo-kl"),
]


@pytest.mark.parametrize("make_loss", LOSSES)
def test_micro_batches_accumulate_exactly_the_single_pass_gradient(parts, make_loss):
    policy, experience, _, _ = parts
    if experience.ref_logprobs is None:
        experience = copy.copy(experience)
        experience.ref_logprobs = experience.old_logprobs - 0.05
    loss = make_loss()
    loss.setup(vocab_size=policy.config.vocab_size, max_completion_length=10)
    threshold = loss.prepare(experience.entropy[experience.loss_mask.bool()])
    whole, whole_loss = _update_delta(policy, loss, experience, threshold, None)
    longest = int(experience.attention_mask.sum(1).max())
    assert len(experience.microbatches(longest + 5)) > 2  # the budget really splits the batch
    split, split_loss = _update_delta(policy, loss, experience, threshold, longest + 5)
    assert split_loss == pytest.approx(whole_loss, abs=1e-6)
    for a, b in zip(whole, split, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_micro_batches_with_sft_mixing_and_overlong_rows_excluded(parts):
    policy, experience, _, demonstrations = parts
    experience = copy.copy(experience)
    experience.excluded = torch.tensor([True, False] * 4)
    loss = PPOClipLoss()
    whole, _ = _update_delta(
        policy, loss, experience, None, None, mu=0.3, demonstrations=demonstrations, mix=ChordPhiLoss()
    )
    split, _ = _update_delta(
        policy, loss, experience, None, 60, mu=0.3, demonstrations=demonstrations, mix=ChordPhiLoss()
    )
    for a, b in zip(whole, split, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_demonstrations_are_scored_at_temperature_one(parts):
    """The SFT term is the data's likelihood, whatever temperature the rollouts use."""
    policy, _, _, demonstrations = parts
    update = PolicyUpdate(PPOClipLoss(), NLLLoss(), NLLLoss(), UpdateConfig(), temperature=0.5)
    hot = copy.deepcopy(policy)
    steps = update.sft_update(hot, torch.optim.SGD(hot.parameters(), lr=0.0), demonstrations)
    cold = PolicyUpdate(PPOClipLoss(), NLLLoss(), NLLLoss(), UpdateConfig(), temperature=1.0)
    reference = cold.sft_update(
        copy.deepcopy(policy), torch.optim.SGD(hot.parameters(), lr=0.0), demonstrations
    )
    assert steps[0]["nll"] == pytest.approx(reference[0]["nll"], abs=1e-6)


# ---------------------------------------------------------------------- through the update


@pytest.mark.parametrize(
    "make_loss",
    [
        lambda: KLCovLoss(kl_cov_ratio=0.2),
        lambda: ClipCovLoss(
            clip_cov_ratio=1.0, clip_cov_lb=0.01, clip_cov_ub=100.0
        ),  # p = 1: no draw matters
    ],
    ids=["kl-cov", "clip-cov"],
)
@pytest.mark.parametrize("stored_old_logprobs", [True, False], ids=["old-logprobs", "one-step"])
def test_update_centres_once_per_batch_and_micro_batches_change_nothing(
    parts,
    make_loss,
    stored_old_logprobs,
):
    """PolicyUpdate.rl_update fixes the centring from the whole rollout batch before its first step
    (scoring the batch itself when it holds no old log-probs), so a token budget that splits the
    batch into micro-batches takes exactly the single-pass step."""
    import copy

    policy, experience, _, _ = parts
    if not stored_old_logprobs:
        experience = copy.copy(experience)
        experience.old_logprobs = None
    loss = make_loss()
    loss.setup(vocab_size=policy.config.vocab_size, max_completion_length=10)
    whole, whole_loss = _update_delta(policy, loss, experience, None, None)
    valid = experience.loss_mask > 0
    assert loss.num_tokens == int(valid.sum())
    assert loss.advantage_mean == pytest.approx(
        float(experience.advantages[:, None].expand_as(valid)[valid].mean())
    )
    if stored_old_logprobs:
        assert loss.logprob_mean == pytest.approx(float(experience.old_logprobs[valid].mean()), rel=1e-6)
    longest = int(experience.attention_mask.sum(1).max())
    assert len(experience.microbatches(longest + 5)) > 2
    split, split_loss = _update_delta(policy, loss, experience, None, longest + 5)
    assert split_loss == pytest.approx(whole_loss, abs=1e-6)
    for a, b in zip(whole, split, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert any(a.abs().max() > 0 for a in whole)
