"""OGER's exploration bonus: formula values, several teachers, schedule, padding, the ordering guarantee."""

import math

import pytest
import torch

from egspo.advantages import group_advantages
from egspo.methods.oger import OGER, BonusSchedule, mean_pool_embeddings
from egspo.schedules import ChordMuSchedule


def call(bonus: OGER, emb, teachers, rewards, correct, entropy=None, mask=None, g=None, k=0, **kw):
    n = len(rewards)
    entropy = torch.zeros(n, 3) if entropy is None else entropy
    mask = torch.ones(n, 3) if mask is None else mask
    return bonus(
        torch.as_tensor(emb, dtype=torch.float32),
        teachers,
        entropy=entropy,
        mask=mask,
        rewards=torch.as_tensor(rewards, dtype=torch.float32),
        correct=torch.as_tensor(correct, dtype=torch.bool),
        group_size=g or n,
        rl_iteration=k,
        **kw,
    )


# ------------------------------------------------------------------ mean pooling
def test_mean_pool_matches_the_naive_mean_and_ignores_padding():
    torch.manual_seed(0)
    weight = torch.randn(11, 4)
    ids = torch.randint(0, 11, (3, 5))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]])
    pooled = mean_pool_embeddings(ids, mask, weight)
    for i in range(2):
        expected = weight[ids[i][mask[i].bool()]].mean(0)
        torch.testing.assert_close(pooled[i], expected)
    assert torch.equal(pooled[2], torch.zeros(4))  # no valid token: the zero vector
    other = ids.clone()
    other[mask == 0] = 10  # whatever the padding ids are
    assert torch.equal(mean_pool_embeddings(other, mask, weight), pooled)


def test_mean_pool_is_fp32_from_a_bf16_table():
    weight = torch.randn(7, 3).bfloat16()
    ids = torch.tensor([[1, 2, 3]])
    out = mean_pool_embeddings(ids, torch.ones(1, 3), weight)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out[0], weight[[1, 2, 3]].float().mean(0))


# ------------------------------------------------------------------ formula values
def test_bonus_values_by_hand_one_teacher():
    teacher = [torch.tensor([[0.0, 1.0]])]
    emb = [[1.0, 0.0], [1.0, 1.0], [0.0, 2.0], [3.0, 0.0]]
    entropy = torch.tensor([[0.0, 0.0, 0.0], [0.5, 1.5, 9.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1], [1, 1, 1]]).float()
    bonus, metrics = call(OGER(), emb, teacher, [1, 1, 1, 0], [1, 1, 1, 0], entropy, mask)
    cap = min(0.1, 0.5 * 1.0)
    expected = torch.tensor(
        [
            cap * 1.0 * 1.0,  # orthogonal to the teacher, entropy 0
            cap * (1 - 1 / math.sqrt(2)) * math.exp(-1.0),  # mean entropy (0.5 + 1.5) / 2 (padding inert)
            0.0,  # same direction as the teacher: no divergence
            0.0,  # wrong: no bonus whatever its divergence
        ]
    )
    torch.testing.assert_close(bonus, expected)
    assert metrics["oger/rewarded_fraction"] == 0.5
    assert metrics["oger/bonus_max"] == pytest.approx(0.1)
    assert metrics["oger/schedule"] == 1.0
    assert metrics["oger/similarity_mean"] == pytest.approx((0 + 1 / math.sqrt(2) + 1) / 3)


def test_entropy_term_off_and_mean_combination():
    teacher = [torch.tensor([[0.0, 1.0]])]
    emb = [[1.0, 1.0], [0.0, 1.0]]
    entropy = torch.full((2, 3), 2.0)
    d = 1 - 1 / math.sqrt(2)
    off, _ = call(OGER(entropy_temperature=None), emb, teacher, [1, 0], [1, 0], entropy)
    torch.testing.assert_close(off, torch.tensor([0.1 * d, 0.0]))
    mean, _ = call(OGER(combine="mean", entropy_temperature=2.0), emb, teacher, [1, 1], [1, 1], entropy)
    torch.testing.assert_close(mean, 0.1 * torch.tensor([(d + math.exp(-1)) / 2, (0 + math.exp(-1)) / 2]))


def test_several_teachers_max_and_mean_similarity():
    teachers = [torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])]
    emb = [[1.0, 1.0]]
    c = 1 / math.sqrt(2)
    nearest, _ = call(OGER(), emb, teachers, [1], [1])
    torch.testing.assert_close(nearest, torch.tensor([0.1 * (1 - c)]))  # max similarity: the nearest teacher
    mean, _ = call(OGER(similarity="mean"), emb, teachers, [1], [1])
    torch.testing.assert_close(mean, torch.tensor([0.1 * (1 - c / 3)]))


def test_padded_teacher_tensor_equals_the_list_form_and_padding_slots_are_inert():
    torch.manual_seed(1)
    emb = torch.randn(6, 5)
    lists = [torch.randn(2, 5), torch.randn(0, 5), torch.randn(3, 5)]
    padded = torch.randn(3, 3, 5) * 100  # garbage in the padding slots
    present = torch.zeros(3, 3, dtype=torch.bool)
    for i, t in enumerate(lists):
        padded[i, : len(t)] = t
        present[i, : len(t)] = True
    rewards, correct = [1, 0, 1, 1, 1, 0], [1, 0, 1, 1, 1, 0]
    for sim in ("max", "mean"):
        a, ma = call(OGER(similarity=sim), emb, lists, rewards, correct, g=2)
        b, mb = call(OGER(similarity=sim), emb, padded, rewards, correct, g=2, teacher_mask=present)
        torch.testing.assert_close(a, b)
        assert ma == pytest.approx(mb)
    # The prompt without teachers gets no bonus, and is counted.
    assert torch.equal(a[2:4], torch.zeros(2))
    assert ma["oger/prompts_without_teachers"] == pytest.approx(1 / 3)


def test_masked_entropy_and_empty_rollouts_are_inert():
    teacher = [torch.tensor([[0.0, 1.0]])]
    emb = [[1.0, 0.0], [0.0, 0.0]]
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]]).float()
    entropy = torch.tensor([[0.2, 0.4, 0.0], [0.0, 0.0, 0.0]])
    base, _ = call(OGER(), emb, teacher, [1, 1], [1, 1], entropy, mask)
    entropy[0, 2] = 50.0
    entropy[1] = 7.0
    again, _ = call(OGER(), emb, teacher, [1, 1], [1, 1], entropy, mask)
    assert torch.equal(base, again)
    assert base[0] == pytest.approx(0.1 * math.exp(-0.3))
    assert base[1] == 0.0  # no tokens: nothing to reward


# ------------------------------------------------------------------ the reward gap and the schedule
def test_cap_follows_the_smallest_reward_gap_of_each_group():
    teacher = [torch.tensor([[0.0, 1.0]])] * 3
    emb = [[1.0, 0.0]] * 9  # divergence 1, confidence 1: the bonus is the cap
    rewards = [1.0, 0.1, 0.0, 1.0, 1.0, 1.0, 1.0, 0.9, 0.0]  # gaps: 0.1, none, 0.1
    correct = [1, 0, 0, 1, 1, 1, 1, 1, 0]
    bonus, metrics = call(OGER(weight=0.3, margin=0.4), emb, teacher, rewards, correct, g=3)
    torch.testing.assert_close(bonus, torch.tensor([0.04, 0, 0, 0.3, 0.3, 0.3, 0.04, 0.04, 0]))
    assert metrics["oger/cap_mean"] == pytest.approx((0.04 + 0.3 + 0.04) / 3)


def test_bonus_schedule_values():
    s = BonusSchedule(warmup_iterations=4, decay_iterations=10, final=0.2)
    assert [s(k) for k in (0, 2, 4)] == [0.0, 0.5, 1.0]
    assert s(9) == pytest.approx(0.6)
    assert s(14) == pytest.approx(0.2) and s(1000) == pytest.approx(0.2)
    assert BonusSchedule()(12345) == 1.0
    assert BonusSchedule(decay_iterations=10, kind="cosine")(5) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="final"):
        BonusSchedule(final=1.5)


def test_schedule_scales_the_bonus_and_must_stay_in_unit_range():
    teacher = [torch.tensor([[0.0, 1.0]])]
    oger = OGER(schedule=BonusSchedule(warmup_iterations=10))
    b0, m0 = call(oger, [[1.0, 0.0]], teacher, [1], [1], k=0)
    b5, m5 = call(oger, [[1.0, 0.0]], teacher, [1], [1], k=5)
    assert b0.item() == 0.0 and m0["oger/rewarded_fraction"] == 0.0
    assert b5.item() == pytest.approx(0.05) and m5["oger/schedule"] == 0.5
    chord = OGER(schedule=ChordMuSchedule(peak=1.0, valley=0.0, decay_iterations=100))  # any callable
    assert call(chord, [[1.0, 0.0]], teacher, [1], [1], k=0)[0].item() == pytest.approx(0.1)
    assert call(chord, [[1.0, 0.0]], teacher, [1], [1], k=100)[0].item() == pytest.approx(0.0)
    with pytest.raises(ValueError, match=r"must be in \[0, 1\]"):
        call(OGER(schedule=lambda k: 2.0), [[1.0, 0.0]], teacher, [1], [1])


# ------------------------------------------------------------------ the ordering guarantee
def test_property_shaped_reward_never_ranks_a_wrong_rollout_above_a_right_one():
    """For random graded rewards, correctness flags, embeddings, entropies, teachers and options:
    (1) a strict order of verifiable rewards is never reversed; (2) a wrong rollout outranks a right
    one of the same prompt after shaping (rewards and advantages) only if it already did before;
    for binary rewards, never."""
    gen = torch.Generator().manual_seed(1234)
    levels = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0, 1.0 + 1e-6])
    for trial in range(400):
        g = int(torch.randint(2, 7, (1,), generator=gen))
        b = int(torch.randint(1, 5, (1,), generator=gen))
        n, d = b * g, 8
        binary = trial % 2 == 0
        if binary:
            correct = torch.rand(n, generator=gen) < 0.5
            rewards = correct.float()
        else:
            rewards = levels[torch.randint(0, len(levels), (n,), generator=gen)]
            rewards = rewards + (torch.rand(n, generator=gen) < 0.2) * torch.rand(n, generator=gen) * 1e-3
            correct = torch.rand(n, generator=gen) < 0.6
        teachers = [
            torch.randn(int(torch.randint(0, 4, (1,), generator=gen)), d, generator=gen) for _ in range(b)
        ]
        emb = torch.randn(n, d, generator=gen)
        entropy = torch.rand(n, 5, generator=gen) * 3
        mask = (torch.rand(n, 5, generator=gen) < 0.8).float()
        oger = OGER(
            weight=float(torch.rand(1, generator=gen)) * 5 + 1e-3,
            margin=float(torch.rand(1, generator=gen)) * 0.98 + 0.01,
            similarity="max" if trial % 3 else "mean",
            entropy_temperature=None if trial % 5 == 0 else 0.5,
            combine="mean" if trial % 7 == 0 else "product",
        )
        bonus, _ = oger(
            emb,
            teachers,
            entropy=entropy,
            mask=mask,
            rewards=rewards,
            correct=correct,
            group_size=g,
            rl_iteration=0,
        )
        assert bool((bonus >= 0).all()) and bool((bonus[~correct] == 0).all())
        shaped = rewards + bonus
        for scale in ("group", "none"):
            for before, after in ((rewards, shaped), (rewards, group_advantages(shaped, g, scale))):
                base, new = before.view(b, g), after.view(b, g)
                right = correct.view(b, g)
                # (1) strict verifiable order kept
                higher = base[:, :, None] > base[:, None, :]
                assert bool((new[:, :, None] >= new[:, None, :])[higher].all())
                # (2) wrong above right after shaping => wrong above right before
                inverted = (~right)[:, :, None] & right[:, None, :] & (new[:, :, None] > new[:, None, :])
                assert bool((base[:, :, None] > base[:, None, :])[inverted].all())
                if binary:
                    assert not bool(inverted.any())


# ------------------------------------------------------------------ validation
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"weight": 0.0}, "weight"),
        ({"margin": 1.0}, "margin"),
        ({"similarity": "min"}, "similarity"),
        ({"entropy_temperature": -1.0}, "entropy_temperature"),
        ({"combine": "sum"}, "combine"),
    ],
)
def test_options_are_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OGER(**kwargs)


def test_shapes_are_validated():
    teacher = [torch.tensor([[0.0, 1.0]])]
    with pytest.raises(ValueError, match="multiple of group_size"):
        call(OGER(), [[1.0, 0.0]] * 3, teacher, [1, 1, 1], [1, 1, 1], g=2)
    with pytest.raises(ValueError, match="one per prompt"):
        call(OGER(), [[1.0, 0.0]] * 2, teacher * 2, [1, 1], [1, 1], g=2)
    with pytest.raises(ValueError, match=r"\[K, D=2\]"):
        call(OGER(), [[1.0, 0.0]], [torch.ones(1, 3)], [1], [1])


def test_constructible_from_yaml_with_a_schedule():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--bonus", type=OGER | None)
    config = parser.parse_object(
        {
            "bonus": {
                "class_path": "egspo.methods.oger.OGER",
                "init_args": {
                    "weight": 0.2,
                    "similarity": "mean",
                    "schedule": {
                        "class_path": "egspo.methods.oger.BonusSchedule",
                        "init_args": {"decay_iterations": 100},
                    },
                },
            }
        }
    )
    bonus = parser.instantiate(config).bonus
    assert isinstance(bonus, OGER) and bonus.weight == 0.2 and bonus.similarity == "mean"
    assert bonus.scale(50) == pytest.approx(0.5)
