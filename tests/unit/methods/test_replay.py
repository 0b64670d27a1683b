"""UEC-RL's pieces: hard prompts, advantages over joint groups, the selection rule, and the replay buffer."""

from __future__ import annotations

import io
from dataclasses import fields

import pytest
import torch
from tiny_model import tiny_qwen2

from egspo.advantages import group_advantages, indexed_group_advantages
from egspo.methods.uec import UECRL, expanded_groups, hard_prompts, select_exploration_samples
from egspo.methods.uec_replay import ReplayBuffer
from egspo.rollout.experience import Experience, concat_rows


def exploration_advantages(
    rewards, expanded_rewards, hard, group_size, expanded_size, scale="group", advantage_group="joint"
):
    """The advantages the builder computes for regular rows followed by UEC-RL's expanded rows."""
    n = rewards.numel()
    ids = torch.cat(
        [torch.arange(n) // group_size, expanded_groups(hard, group_size, expanded_size, advantage_group)]
    )
    advantages = indexed_group_advantages(torch.cat([rewards, expanded_rewards]), ids, scale)
    return advantages[:n], advantages[n:]


PAD = 0


def rollout_like(
    prompts: list[list[int]],
    completions: list[list[int]],
    advantages: list[float],
    *,
    extra_prompt: int = 0,
    extra_completion: int = 0,
    seed: int = 0,
    ref: bool = True,
) -> Experience:
    """An engine-shaped experience: prompts left-padded, completions right-padded (plus extra
    padding columns), attention = prompt mask | completion mask, random per-token scores."""
    gen = torch.Generator().manual_seed(seed)
    n = len(prompts)
    p = max(map(len, prompts)) + extra_prompt
    c = max(map(len, completions)) + extra_completion
    ids = torch.full((n, p + c), PAD, dtype=torch.long)
    attention = torch.zeros(n, p + c, dtype=torch.long)
    mask = torch.zeros(n, c)
    for i, (q, a) in enumerate(zip(prompts, completions, strict=True)):
        ids[i, p - len(q) : p] = torch.tensor(q)
        attention[i, p - len(q) : p] = 1
        ids[i, p : p + len(a)] = torch.tensor(a)
        attention[i, p : p + len(a)] = 1
        mask[i, : len(a)] = 1
    return Experience(
        input_ids=ids,
        attention_mask=attention,
        completion_mask=mask,
        entropy=torch.rand(n, c, generator=gen) * mask,
        advantages=torch.tensor(advantages, dtype=torch.float32),
        rewards=(torch.tensor(advantages) > 0).float(),
        truncated=torch.zeros(n, dtype=torch.bool),
        prompt_length=p,
        old_logprobs=-torch.rand(n, c, generator=gen) * mask,
        ref_logprobs=-torch.rand(n, c, generator=gen) * mask if ref else None,
        correct=torch.tensor(advantages) > 0,
    )


def assert_experiences_equal(a: Experience, b: Experience) -> None:
    for f in fields(Experience):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, torch.Tensor):
            assert isinstance(y, torch.Tensor) and x.dtype == y.dtype and torch.equal(x, y), f.name
        else:
            assert x == y, f.name


# ------------------------------------------------------------------ options
def test_uec_config_defaults_and_validation():
    config = UECRL()
    assert (config.exploration_temperature, config.replay.capacity, config.replay.min_advantage) == (
        1.2,
        128,
        1.0,
    )
    with pytest.raises(ValueError, match="exploration_temperature"):
        UECRL(exploration_temperature=0.0)
    with pytest.raises(ValueError, match="expanded_keep"):
        UECRL(expanded_keep="all")
    with pytest.raises(ValueError, match="replay_every"):
        UECRL(replay_every=0)


def test_replay_rhythm_is_a_function_of_the_iteration():
    assert [k for k in range(12) if UECRL(replay_every=4).replay_due(k)] == [3, 7, 11]
    assert not any(UECRL(replay_capacity=0).replay_due(k) for k in range(12))


# ------------------------------------------------------------------ targeted exploration
def test_hard_prompts_by_correctness_or_zero_rewards():
    rewards = torch.tensor([0.0, 0.0, 0.1, 0.0, 1.0, 0.0])
    correct = torch.tensor([False, False, False, False, True, False])
    assert hard_prompts(rewards, correct, 2).tolist() == [True, True, False]
    assert hard_prompts(rewards, correct, 2, rule="all_zero").tolist() == [True, False, False]


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_without_hard_prompts_advantages_are_grpos(scale):
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5, 0.0, 1.0])
    regular, expanded = exploration_advantages(
        rewards, torch.zeros(0), torch.zeros(3, dtype=torch.bool), 2, 4, scale=scale
    )
    torch.testing.assert_close(regular, group_advantages(rewards, 2, scale=scale))
    assert expanded.shape == (0,)


def test_joint_and_separate_groups_by_hand():
    rewards = torch.tensor([0.0, 0.0, 1.0, 0.0])  # prompt 0 hard, prompt 1 not
    hard = torch.tensor([True, False])
    expanded_rewards = torch.tensor([1.0, 0.0])
    regular, expanded = exploration_advantages(rewards, expanded_rewards, hard, 2, 2)
    # joint group [0, 0, 1, 0]: mean 0.25, Bessel std 0.5
    torch.testing.assert_close(regular[:2], torch.tensor([-0.5, -0.5]), atol=1e-5, rtol=0)
    torch.testing.assert_close(expanded, torch.tensor([1.5, -0.5]), atol=1e-5, rtol=0)
    torch.testing.assert_close(regular[2:], group_advantages(rewards, 2)[2:])
    regular, expanded = exploration_advantages(
        rewards, expanded_rewards, hard, 2, 2, advantage_group="separate"
    )
    torch.testing.assert_close(regular, group_advantages(rewards, 2))
    torch.testing.assert_close(expanded, group_advantages(expanded_rewards, 2))


def test_batch_scale_uses_the_std_of_regular_and_expanded_rewards():
    rewards = torch.tensor([0.0, 0.0, 1.0, 0.0])
    expanded_rewards = torch.tensor([1.0, 1.0, 0.0])
    hard = torch.tensor([True, False])
    regular, expanded = exploration_advantages(rewards, expanded_rewards, hard, 2, 3, scale="batch")
    std = torch.cat([rewards, expanded_rewards]).std()
    torch.testing.assert_close(regular[2:], torch.tensor([0.5, -0.5]) / (std + 1e-6))
    # the hard prompt's joint group [0, 0 | 1, 1, 0] has mean 0.4
    torch.testing.assert_close(regular[:2], torch.tensor([-0.4, -0.4]) / (std + 1e-6))
    torch.testing.assert_close(expanded, (expanded_rewards - 0.4) / (std + 1e-6))


def test_selection_rule():
    adv = torch.tensor([0.0, 1.2, -0.3, 0.0])
    exp = torch.tensor([0.0, 2.0, -1.0])
    keep, keep_expanded = select_exploration_samples(adv, exp)
    assert keep.tolist() == [False, True, True, False]  # regular: A != 0
    assert keep_expanded.tolist() == [True, True, False]  # expanded: A >= 0
    keep, keep_expanded = select_exploration_samples(adv, exp, regular_keep="all", expanded_keep="positive")
    assert keep.all() and keep_expanded.tolist() == [False, True, False]


def test_a_hard_prompt_end_to_end():
    """G = 4 regular samples all wrong; G' = 4 expanded, one right: the regular failures are pushed
    down, the expanded success is kept, the expanded failures are dropped."""
    rewards = torch.zeros(4)
    correct = torch.zeros(4, dtype=torch.bool)
    hard = hard_prompts(rewards, correct, 4)
    regular, expanded = exploration_advantages(rewards, torch.tensor([0.0, 1.0, 0.0, 0.0]), hard, 4, 4)
    keep, keep_expanded = select_exploration_samples(regular, expanded)
    assert bool((regular < 0).all()) and keep.all()
    assert keep_expanded.tolist() == [False, True, False, False]
    # nothing found at t' either: no signal, regular rows drop out, the expanded (A = 0) stay by the letter
    regular, expanded = exploration_advantages(rewards, torch.zeros(4), hard, 4, 4)
    keep, keep_expanded = select_exploration_samples(regular, expanded)
    assert not keep.any() and keep_expanded.all()


# ------------------------------------------------------------------ the buffer
def test_threshold_is_strict_and_excluded_or_empty_rows_are_skipped():
    exp = rollout_like([[5, 6]] * 5, [[7, 8], [9], [3, 4], [2], [1]], [1.0, 1.5, 2.0, 3.0, 0.5])
    exp.excluded = torch.tensor([False, False, True, False, False])
    exp.completion_mask[3] = 0  # a row with no completion token
    buffer = ReplayBuffer(capacity=10, min_advantage=1.0)
    assert buffer.add(exp, temperature=1.0, iteration=0) == 1
    assert buffer.batch().advantages.tolist() == [1.5]


def test_capacity_keeps_the_latest_rows_in_order():
    buffer = ReplayBuffer(capacity=3, min_advantage=0.0)
    for it in range(3):
        exp = rollout_like([[1, 2]] * 2, [[3], [4]], [it + 0.1, it + 0.2])
        buffer.add(exp, temperature=1.0, iteration=it)
    batch = buffer.batch()
    assert torch.allclose(batch.advantages, torch.tensor([1.2, 2.1, 2.2]))
    big = rollout_like([[1]] * 5, [[3]] * 5, [9.1, 9.2, 9.3, 9.4, 9.5])
    assert buffer.add(big, temperature=1.0, iteration=3) == 5  # added, then the oldest evicted
    assert torch.allclose(buffer.batch().advantages, torch.tensor([9.3, 9.4, 9.5]))
    assert buffer.metrics(rl_iteration=5) == pytest.approx(
        {
            "replay/size": 3.0,
            "replay/added_total": 11.0,
            "replay/advantage_mean": 9.4,
            "replay/temperature_mean": 1.0,
            "replay/age_mean": 2.0,
        }
    )


def test_rows_of_different_widths_are_repadded_left_and_right():
    prompts = [[11, 12, 13], [21], [31, 32]]
    completions = [[14], [22, 23, 24, 25], [33, 34]]
    first = rollout_like(prompts[:2], completions[:2], [2.0, 3.0], extra_prompt=2, extra_completion=3, seed=1)
    second = rollout_like(prompts[2:], completions[2:], [4.0], extra_prompt=5, seed=2)
    buffer = ReplayBuffer(capacity=8, min_advantage=1.0, pad_token_id=PAD)
    buffer.add(first, temperature=1.0, iteration=0)
    buffer.add(second, temperature=1.0, iteration=1)
    batch = buffer.batch()
    p, c = 3, 4  # the widest prompt and completion, no extra padding kept
    assert batch.prompt_length == p and batch.completion_mask.shape == (3, c)
    assert batch.input_ids.shape == batch.attention_mask.shape == (3, p + c)
    for f in ("entropy", "old_logprobs", "ref_logprobs"):
        assert getattr(batch, f).shape == (3, c)
    for i, (q, a) in enumerate(zip(prompts, completions, strict=True)):
        assert (
            batch.input_ids[i, : p - len(q)].eq(PAD).all()
            and batch.attention_mask[i, : p - len(q)].eq(0).all()
        )
        assert (
            batch.input_ids[i, p - len(q) : p].tolist() == q
            and batch.attention_mask[i, p - len(q) : p].eq(1).all()
        )
        assert batch.input_ids[i, p : p + len(a)].tolist() == a
        assert batch.completion_mask[i].tolist() == [1.0] * len(a) + [0.0] * (c - len(a))
    # masks agree with each other, no column is padding everywhere, the per-token scores are the rows'
    assert torch.equal(batch.attention_mask[:, p:].float(), batch.completion_mask)
    assert batch.trim() is batch
    sources = [(first, 0), (first, 1), (second, 0)]
    for i, (src, j) in enumerate(sources):
        n = len(completions[i])
        for f in ("entropy", "old_logprobs", "ref_logprobs"):
            assert torch.equal(getattr(batch, f)[i, :n], getattr(src, f)[j, :n])
            assert getattr(batch, f)[i, n:].eq(0).all()
    assert batch.advantages.tolist() == [2.0, 3.0, 4.0] and batch.correct.tolist() == [True] * 3
    assert batch.loss_mask.sum() == sum(map(len, completions))


def test_mixed_reference_presence_drops_the_reference():
    buffer = ReplayBuffer(min_advantage=0.0)
    buffer.add(rollout_like([[1]], [[2]], [1.0]), temperature=1.0, iteration=0)
    assert buffer.batch().ref_logprobs is not None
    buffer.add(rollout_like([[1]], [[2]], [1.0], ref=False), temperature=1.0, iteration=0)
    assert buffer.batch().ref_logprobs is None


def test_temperatures_per_row_and_filtering():
    buffer = ReplayBuffer(min_advantage=0.0)
    exp = rollout_like([[1]] * 3, [[2], [3], [4]], [1.0, 2.0, 3.0])
    buffer.add(exp, temperature=torch.tensor([1.0, 1.2, 1.0]), iteration=0)
    buffer.add(rollout_like([[1]], [[5]], [4.0]), temperature=0.7, iteration=1)
    assert buffer.temperatures() == pytest.approx([0.7, 1.0, 1.2])
    assert buffer.row_temperatures().tolist() == pytest.approx([1.0, 1.2, 1.0, 0.7])
    assert buffer.batch(temperature=1.0).advantages.tolist() == [1.0, 3.0]
    assert buffer.batch(temperature=1.2).input_ids[:, -1].tolist() == [3]
    assert buffer.batch(temperature=2.0) is None and ReplayBuffer().batch() is None
    # a random subset and its temperatures, aligned row by row; positions count within the filter
    index = buffer.sample_index(2, torch.Generator().manual_seed(3))
    subset = buffer.batch(index=index)
    by_row = {2: 1.0, 3: 1.2, 4: 1.0, 5: 0.7}  # completion token -> temperature
    assert buffer.row_temperatures(index=index).tolist() == pytest.approx(
        [by_row[t] for t in subset.input_ids[:, -1].tolist()]
    )
    assert buffer.batch(temperature=1.0, index=torch.tensor([1])).input_ids[:, -1].tolist() == [4]
    # kept at float32 precision: 1.2 as a Python float and as a float32 tensor are one temperature
    buffer.add(rollout_like([[1]], [[6]], [5.0]), temperature=1.2, iteration=2)
    assert len(buffer.temperatures()) == 3 and len(buffer.batch(temperature=1.2)) == 2


def test_sample_is_deterministic_and_in_buffer_order():
    buffer = ReplayBuffer(min_advantage=0.0)
    buffer.add(
        rollout_like([[1]] * 6, [[i + 2] for i in range(6)], [1, 2, 3, 4, 5, 6]), temperature=1, iteration=0
    )
    a = buffer.sample(3, torch.Generator().manual_seed(7))
    b = buffer.sample(3, torch.Generator().manual_seed(7))
    assert_experiences_equal(a, b)
    assert a.advantages.tolist() == sorted(a.advantages.tolist()) and len(a) == 3
    assert len(buffer.sample(100)) == 6
    index = buffer.sample_index(3, torch.Generator().manual_seed(7))
    assert_experiences_equal(buffer.batch(index=index), a)
    assert buffer.row_temperatures(index=index).shape == (3,)


def test_behaviour_logprobs_are_required():
    exp = rollout_like([[1]], [[2]], [2.0])
    exp.old_logprobs = None
    with pytest.raises(ValueError, match="behaviour log-probs"):
        ReplayBuffer().add(exp, temperature=1.0, iteration=0)
    behaviour = -torch.ones(1, 1)
    buffer = ReplayBuffer()
    buffer.add(exp, temperature=1.0, iteration=0, behaviour_logprobs=behaviour)
    assert torch.equal(buffer.batch().old_logprobs, behaviour)


def test_state_round_trip_through_torch_save_is_exact_and_resume_continues_alike():
    def tokens(gen: torch.Generator, longest: int) -> list[int]:
        length = int(torch.randint(1, longest + 1, (1,), generator=gen))
        return (torch.randint(0, 50, (length,), generator=gen) + 1).tolist()

    def feed(buffer: ReplayBuffer, start: int, stop: int) -> None:
        for it in range(start, stop):
            gen = torch.Generator().manual_seed(it)
            prompts = [tokens(gen, 4) for _ in range(4)]
            completions = [tokens(gen, 5) for _ in range(4)]
            adv = (torch.randn(4, generator=gen) * 2).tolist()
            exp = rollout_like(prompts, completions, adv, extra_completion=it % 3, seed=it, ref=it % 2 == 0)
            buffer.add(exp, temperature=1.0 if it % 3 else 1.3, iteration=it)

    full = ReplayBuffer(capacity=6, min_advantage=0.2)
    feed(full, 0, 5)
    saved = io.BytesIO()
    torch.save({"egspo": {"replay": full.state_dict()}}, saved)
    saved.seek(0)
    state = torch.load(saved, weights_only=True)["egspo"]["replay"]
    resumed = ReplayBuffer(capacity=6, min_advantage=0.2)
    resumed.load_state_dict(state)
    assert len(resumed) == len(full) > 0
    assert_experiences_equal(resumed.batch(), full.batch())
    assert resumed.row_temperatures().tolist() == full.row_temperatures().tolist()
    feed(full, 5, 9)
    feed(resumed, 5, 9)
    assert_experiences_equal(resumed.batch(), full.batch())
    assert resumed.metrics(9) == full.metrics(9)
    smaller = ReplayBuffer(capacity=2)
    smaller.load_state_dict(state)
    assert_experiences_equal(smaller.batch(), full_state_tail(state, 2))


def full_state_tail(state: dict, k: int) -> Experience:
    buffer = ReplayBuffer(capacity=len(state["rows"]))
    buffer.load_state_dict({**state, "rows": state["rows"][-k:]})
    return buffer.batch()


def test_replay_batch_drives_a_policy_update_with_ratio_one_against_its_behaviour_policy():
    """Behaviour log-probs scored at t' on the wide original layout; the buffer's re-padded batch,
    scored by the update at the same t', gives ratio 1 on the first step: layouts and positions
    are consistent, and the update's ratio is the importance ratio against the behaviour policy."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from egspo.config import UpdateConfig
    from egspo.losses import NLLLoss, PPOClipLoss
    from egspo.scoring import token_logprobs
    from egspo.update import PolicyUpdate

    torch.manual_seed(0)
    policy = Qwen2ForCausalLM(Qwen2Config(**tiny_qwen2(vocab_size=64)))
    prompts = [[5, 6, 7], [8], [9, 10], [11, 12, 13, 14]]
    completions = [[20, 21], [22, 23, 24, 25, 26], [27], [28, 29, 30]]
    exp = rollout_like(prompts, completions, [2.0, 0.5, 3.0, 1.5], extra_prompt=2, extra_completion=2)
    t = 1.3
    with torch.no_grad():
        scores = token_logprobs(policy, exp.input_ids, exp.attention_mask, exp.score_mask(), temperature=t)
    p = exp.prompt_length
    exp.old_logprobs, exp.entropy = scores.logprobs[:, p:], scores.entropy[:, p:]
    buffer = ReplayBuffer(capacity=8, min_advantage=1.0)
    assert buffer.add(exp, temperature=t, iteration=0) == 3
    (temperature,) = buffer.temperatures()
    batch = buffer.batch(temperature)
    with torch.no_grad():  # the re-padded rows score as they did in their original layout, at their t'
        again = token_logprobs(
            policy, batch.input_ids, batch.attention_mask, batch.score_mask(), temperature=t
        )
        other = token_logprobs(
            policy, batch.input_ids, batch.attention_mask, batch.score_mask(), temperature=1.0
        )
    valid = batch.completion_mask.bool()
    q = batch.prompt_length
    torch.testing.assert_close(again.logprobs[:, q:][valid], batch.old_logprobs[valid], atol=1e-5, rtol=0)
    assert not torch.allclose(other.logprobs[:, q:][valid], batch.old_logprobs[valid], atol=1e-3)
    update = PolicyUpdate(PPOClipLoss(), NLLLoss(), NLLLoss(), UpdateConfig(), temperature=temperature)
    before = [w.detach().clone() for w in policy.parameters()]
    (step,) = update.rl_update(policy, torch.optim.SGD(policy.parameters(), lr=0.1), batch, threshold=None)
    assert step["ratio_mean"] == pytest.approx(1.0, abs=1e-5)
    assert step["clip_frac_low"] == 0.0 and step["clip_frac_high"] == 0.0
    assert torch.isfinite(torch.tensor(step["loss"]))
    assert any(not torch.equal(a, b) for a, b in zip(before, policy.parameters(), strict=True))


def test_uec_is_constructible_from_yaml_as_a_method():
    from jsonargparse import ArgumentParser

    from egspo.methods import RLMethod

    parser = ArgumentParser()
    parser.add_argument("--methods", type=list[RLMethod])
    init = {"exploration_temperature": 1.4, "replay_every": 2}
    config = parser.parse_object({"methods": [{"class_path": "egspo.methods.UECRL", "init_args": init}]})
    [uec] = parser.instantiate(config).methods
    assert isinstance(uec, UECRL) and (uec.exploration_temperature, uec.replay_every) == (1.4, 2)


# ------------------------------------------------------------------ merging regular and expanded rows
def test_concat_rows_repads_and_keeps_every_row():
    regular = rollout_like([[1, 2, 3], [4]], [[5], [6, 7]], [1.0, -1.0], extra_completion=1, seed=3)
    regular.excluded = torch.tensor([False, True])
    regular.completions = ["a", "b"]
    expanded = rollout_like([[8, 9]], [[10, 11, 12, 13]], [2.0], extra_prompt=3, seed=4)
    expanded.completions = ["c"]
    merged = concat_rows([regular, expanded], PAD)
    p, c = 5, 4  # the widest prompt layout (2 + 3 padding) and completion
    assert (
        merged.prompt_length == p
        and merged.input_ids.shape == (3, p + c)
        and merged.completion_mask.shape == (3, c)
    )
    for i, (src, j) in enumerate([(regular, 0), (regular, 1), (expanded, 0)]):
        q, w = src.prompt_length, src.completion_mask.shape[1]
        assert torch.equal(merged.input_ids[i, p - q : p], src.input_ids[j, :q])
        assert merged.input_ids[i, : p - q].eq(PAD).all() and merged.attention_mask[i, : p - q].eq(0).all()
        assert torch.equal(merged.input_ids[i, p : p + w], src.input_ids[j, q:])
        assert torch.equal(merged.attention_mask[i, p : p + w], src.attention_mask[j, q:])
        for f in ("completion_mask", "entropy", "old_logprobs", "ref_logprobs"):
            assert torch.equal(getattr(merged, f)[i, :w], getattr(src, f)[j])
            assert getattr(merged, f)[i, w:].eq(0).all()
    assert merged.excluded.tolist() == [False, True, False]  # None: no row excluded
    assert merged.completions == ["a", "b", "c"]
    assert merged.advantages.tolist() == [1.0, -1.0, 2.0]
    # the same token scores come out of the merged layout: positions only count attended tokens
    assert torch.equal(merged.score_mask()[:, p:], merged.completion_mask)
    expanded.old_logprobs = None
    with pytest.raises(ValueError, match="old_logprobs is set in some parts only"):
        concat_rows([regular, expanded], PAD)
