"""Synthetic arithmetic task: determinism, split disjointness, correct answers, knobs."""

import re

import pytest

from egspo.data import SyntheticArithmetic
from egspo.rewards import MathReward

LINE = re.compile(r"(\d+) ([+\-*]) (\d+) = (\d+)")
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
VERBS = {"+": ("more",), "-": ("loses", "gives away", "sells"), "*": ("times as many",)}


def parse_solution(response):
    *steps, final = response.split("\n")
    assert final.startswith("#### ")
    return [LINE.fullmatch(s).groups() for s in steps], final[5:]


def check_example(example, task):
    steps, final = parse_solution(example.response)
    assert len(steps) == task.num_steps
    numbers_in_question = [int(n) for n in re.findall(r"\d+", example.prompt)]
    value = int(steps[0][0])
    assert numbers_in_question[0] == value
    clauses = example.prompt.split(". ", 1)[1].split(", then ")
    for (a, op, b, c), operand, clause in zip(steps, numbers_in_question[1:], clauses, strict=True):
        a, b, c = int(a), int(b), int(c)
        assert a == value and b == operand
        assert OPS[op](a, b) == c >= 0
        assert op in task.operations
        assert any(v in clause for v in VERBS[op])
        value = c
    assert final == example.answer == str(value)


def signature(example):
    return parse_solution(example.response)[0]


def test_deterministic_in_seed():
    a = SyntheticArithmetic(seed=3).generate(200)
    assert a == SyntheticArithmetic(seed=3).generate(200)
    assert a != SyntheticArithmetic(seed=4).generate(200)
    assert SyntheticArithmetic(seed=3).generate(50) == a[:50]  # a prefix: n does not change the stream


def test_train_and_test_disjoint():
    task = SyntheticArithmetic(seed=0, train_size=20000, test_size=500)
    train, test = task.generate(split="train"), task.generate(split="test")
    assert len(train) == 20000 and len(test) == 500
    train_sigs = {tuple(signature(e)) for e in train}
    test_sigs = {tuple(signature(e)) for e in test}
    assert len(test_sigs) == 500 and len(train_sigs) == 20000  # no duplicates within a split
    assert not train_sigs & test_sigs
    assert not {e.prompt for e in train} & {e.prompt for e in test}


@pytest.mark.parametrize(
    "settings",
    [
        dict(),
        dict(num_steps=1),
        dict(num_steps=4, operations="+-*", max_digits=3),
        dict(num_steps=3, operations="-", min_digits=1, max_digits=3),
        dict(num_steps=2, operations="*", max_multiplier=5),
    ],
)
def test_answers_are_correct_and_never_negative(settings):
    task = SyntheticArithmetic(seed=11, **settings)
    for example in task.generate(300) + task.generate(100, split="test"):
        check_example(example, task)


def test_difficulty_knobs():
    wide = SyntheticArithmetic(seed=1, min_digits=3, max_digits=3, operations="+")
    for example in wide.generate(100):
        numbers = [int(n) for n in re.findall(r"\d+", example.prompt)]
        assert all(100 <= n <= 999 for n in numbers)
    mixed = SyntheticArithmetic(seed=1, num_steps=3, operations="+-*", max_multiplier=4).generate(300)
    ops = [op for e in mixed for _, op, _, _ in signature(e)]
    assert {"+", "-", "*"} <= set(ops)
    assert all(int(b) <= 4 for e in mixed for _, op, b, _ in signature(e) if op == "*")
    assert all(len(e.response.split("\n")) == 4 for e in mixed)
    plus_only = SyntheticArithmetic(seed=1, operations="+").generate(100)
    assert all(op == "+" for e in plus_only for _, op, _, _ in signature(e))
    custom = SyntheticArithmetic(seed=1, names=("Bo",), objects=("pears",)).generate(5)
    assert all(e.prompt.startswith("Bo has") and ". Bo " in e.prompt and "pears" in e.prompt for e in custom)


def test_invalid_settings_and_small_space():
    for bad in (
        dict(num_steps=0),
        dict(min_digits=3, max_digits=2),
        dict(operations="+/"),
        dict(test_fraction=1.0),
    ):
        with pytest.raises(ValueError):
            SyntheticArithmetic(**bad)
    tiny = SyntheticArithmetic(num_steps=1, max_digits=1, operations="+")  # 81 problems in all
    with pytest.raises(ValueError, match="problem space is too small"):
        tiny.generate(100)


def test_corpus_and_rewards_agree():
    task = SyntheticArithmetic(seed=2)
    assert len(list(task.corpus(10))) == 20
    test = task.generate(200, split="test")
    reward = MathReward()
    try:
        out = reward([e.response for e in test], [e.answer for e in test])
    finally:
        reward.close()
    assert out.metrics["reward/accuracy"] == 1.0 and out.metrics["reward/format"] == 1.0
