"""The math reward's answer policy: wrong answers it once paid score 0, equivalents score 1."""

from fractions import Fraction

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from egspo.rewards import MathReward


@pytest.fixture(scope="module")
def reward():
    r = MathReward(timeout_seconds=3.0, num_workers=2)
    yield r
    r.close()


# (gold, completion): each paid 1 before the policy was written down, each is wrong.
WRONG = [
    pytest.param("10", "So the answer is 2^{10}.", id="exponent-read-as-last-number"),
    pytest.param("5", r"2+3=5, so \boxed{}", id="empty-box-falls-back-to-a-number"),
    pytest.param("5", r"\boxed{6 = 5}", id="right-hand-side-of-a-false-equation"),
    pytest.param("5", r"\boxed{5\text{ cm}, 6\text{ cm}}", id="first-item-of-a-list"),
    pytest.param(r"\{x|-2\leq x < 1\}", r"\boxed{1}", id="set-builder-gold-read-as-1"),
    pytest.param(r"x \neq \pm 5", r"\boxed{5}", id="neq-gold-read-as-5"),
    pytest.param(r"1-5\mathrm{i}", r"\boxed{-4}", id="complex-gold-read-as-real"),
    pytest.param("N=n", r"\boxed{N=n+1}", id="case-folded-gold"),
    pytest.param("0.5", r"\boxed{0.5000001}", id="decimal-rounded-to-6-places"),
    pytest.param(r"\pi", r"\boxed{3.1415927}", id="pi-rounded"),
    pytest.param(r"\frac{1}{3}", r"\boxed{0.3333333}", id="third-rounded"),
    pytest.param("1/3", r"\boxed{0.3333333}", id="third-rounded-plain-gold"),
    # and a few neighbours of those
    pytest.param("5", r"\boxed{5} and then \boxed{\frac{3}{", id="truncated-last-box"),
    pytest.param("5", r"\boxed{2x = 10}", id="equation-without-a-lone-variable"),
    pytest.param("5", r"\boxed{x = 6 = 5}", id="chain-with-a-false-link"),
    pytest.param("5", r"\boxed{x > 5}", id="inequality-for-a-value"),
    pytest.param("5", r"\boxed{5, 6}", id="list-for-a-value"),
    pytest.param("234", r"\boxed{0, 234}", id="list-read-as-thousands"),
    pytest.param("52_8", r"\boxed{52_9}", id="other-base"),
    pytest.param("52_8", r"\boxed{52}", id="base-dropped"),
    pytest.param(r"\frac{\sqrt{2}}{2}", r"\boxed{\frac{\sqrt{2}}{2} + 10^{-20}}", id="off-by-1e-20"),
    pytest.param("a+4c", r"\boxed{a+4}", id="variable-c-is-not-a-unit"),
]

# (gold, completion): equivalent answers.
RIGHT = [
    pytest.param("265.0", r"\boxed{\text{265}}", id="text-wrapped-number"),
    pytest.param("-4", r"\boxed{-4\%}", id="percent-sign-is-a-unit"),
    pytest.param(r"4.5\times10^{33}", r"\boxed{4.5e33}", id="scientific-notation"),
    pytest.param(r"1-5\mathrm{i}", r"\boxed{1-5i}", id="upright-imaginary-unit"),
    pytest.param("0.5", r"\boxed{\frac{1}{2}}", id="exact-decimal"),
    pytest.param("5", r"\boxed{x = 5}", id="assignment"),
    pytest.param("5", r"\boxed{x = 2 + 3 = 5}", id="true-chain"),
    pytest.param("x = 5", r"\boxed{5}", id="value-of-an-assignment-gold"),
    pytest.param("1,-2", r"\boxed{-2, 1}", id="set-in-any-order"),
    pytest.param(r"5\text{ cm}", r"\boxed{5}", id="unit-dropped"),
    pytest.param("52_8", r"\boxed{52_{8}}", id="lossy-gold-pays-its-own-text"),
    pytest.param("4", r"Total: 2 + 2 = 4." + "\n#### 4", id="gsm8k-marker"),
]


@pytest.mark.parametrize(("gold", "completion"), WRONG)
def test_wrong_answers_score_zero(reward, gold, completion):
    assert reward([completion], [gold]).rewards.tolist() == [0.0]


@pytest.mark.parametrize(("gold", "completion"), RIGHT)
def test_equivalent_answers_score_one(reward, gold, completion):
    assert reward([completion], [gold]).rewards.tolist() == [1.0]


def test_golds_are_classified_with_reasons(reward):
    classes = reward.classify_golds(["5", r"\frac{\sqrt{2}}{2}", "N=n", "52_8", r"x \neq \pm 5", "", "5"])
    assert [flag for flag, _ in classes] == ["ok", "ok", "lossy", "lossy", "unparsable", "unparsable", "ok"]
    assert "case" in classes[2][1] and "base" in classes[3][1]


def test_lossy_and_unparsable_golds_are_counted(reward):
    out = reward([r"\boxed{N=n}", r"\boxed{N=n+1}", r"\boxed{x \neq \pm 5}"], ["N=n", "N=n", r"x \neq \pm 5"])
    assert out.rewards.tolist() == [1.0, 0.0, 0.0]
    assert out.metrics["reward/lossy_gold"] == 2
    assert out.metrics["reward/unparsable_gold"] == 1


def test_relative_tolerance_is_opt_in():
    tolerant = MathReward(timeout_seconds=3.0, num_workers=1, rel_tol=1e-4)
    try:
        out = tolerant(
            [r"\boxed{0.33333}", r"\boxed{3.14159}", r"\boxed{0.33}", r"\boxed{1000.01}", r"\boxed{1001}"],
            [r"\frac{1}{3}", r"\pi", r"\frac{1}{3}", "1000", "1000"],
        )
    finally:
        tolerant.close()
    assert out.rewards.tolist() == [1.0, 1.0, 0.0, 1.0, 0.0]


def test_number_fallback_is_opt_in_and_never_overrides_a_marker():
    fallback = MathReward(number_fallback=True)
    try:
        out = fallback(
            ["The answer is 42.", "So the answer is 2^{10}.", r"\boxed{} 42", "#### \n42"],
            ["42", "10", "42", "42"],
        )
    finally:
        fallback.close()
    assert out.rewards.tolist() == [1.0, 0.0, 0.0, 0.0]


# --- property: boxing a never answers b ---------------------------------------------------

NUMBERS = st.one_of(
    st.integers(-(10**6), 10**6).map(Fraction),
    st.builds(Fraction, st.integers(-999, 999), st.integers(1, 999)),
    st.builds(
        lambda m, e: Fraction(m, 10**e), st.integers(-(10**5), 10**5), st.integers(1, 4)
    ),  # exact decimals
)


def _frac(value: Fraction) -> str:
    if value.denominator == 1:
        return str(value.numerator)
    sign = "-" if value < 0 else ""
    return f"{sign}\\frac{{{abs(value.numerator)}}}{{{value.denominator}}}"


def _decimal(value: Fraction) -> str | None:
    """The exact decimal of ``value``, or None when it has none (1/3)."""
    den, twos, fives = value.denominator, 0, 0
    while den % 2 == 0:
        den, twos = den // 2, twos + 1
    while den % 5 == 0:
        den, fives = den // 5, fives + 1
    if den != 1:
        return None
    places = max(twos, fives)
    scaled = abs(value.numerator) * 10**places // value.denominator
    digits = str(scaled).rjust(places + 1, "0")
    sign = "-" if value < 0 else ""
    return sign + (digits[:-places] + "." + digits[-places:] if places else digits)


def _forms(value: Fraction) -> list[str]:
    decimal = _decimal(value)
    return [_frac(value)] + ([decimal] if decimal is not None else [])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(a=NUMBERS, b=NUMBERS)
def test_boxing_a_never_answers_b(reward, a, b):
    if a == b:
        return
    completions, golds = [], []
    for gold in _forms(b):
        for pred in _forms(a):
            completions += [rf"\boxed{{{pred}}}", rf"\boxed{{x = {pred}}}", rf"\boxed{{{gold} = {pred}}}"]
            completions += [rf"\boxed{{{pred}, {gold}}}"]
            golds += [gold] * 4
    out = reward(completions, golds)
    paid = [(c, g) for c, g, r in zip(completions, golds, out.rewards.tolist(), strict=True) if r]
    assert not paid
    # and the same forms of b itself do answer b (the test is not vacuous)
    right = [rf"\boxed{{{pred}}}" for pred in _forms(b)] + [rf"\boxed{{x = {_frac(b)}}}"]
    assert reward(right, [_frac(b)] * len(right)).rewards.tolist() == [1.0] * len(right)
