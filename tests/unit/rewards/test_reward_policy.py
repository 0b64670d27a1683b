"""The math reward's answer policy: wrong answers it once paid score 0, equivalents score 1."""

from fractions import Fraction

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from egspo.rewards import FormatReward, MathReward
from egspo.rewards.extraction import extract_answer, last_boxed
from egspo.rewards.numeric import canonical_text, exact_number
from egspo.rewards.units import split_answer


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


# --- one test per class of wrong answer the policy used to pay (issue 20) ------------------


def _scores(reward, pairs: list[tuple[str, str]]) -> list[float]:
    """Reward of each ``(gold, boxed answer)`` pair, in one call."""
    return reward([rf"\boxed{{{pred}}}" for _, pred in pairs], [gold for gold, _ in pairs]).rewards.tolist()


def test_only_known_unit_words_are_dropped_and_units_are_compared(reward):
    wrong = [
        ("5", r"5 \text{ thousand}"),  # a word that changes the value
        ("5", r"5\text{ squared}"),  # an operation word
        ("5", r"5 \text{ below zero}"),  # a qualifier
        ("5", r"5 \text{ k}"),
        ("5", r"\text{5 apples}"),  # a counted noun is not a unit either
        ("5", r"5 \text{ more}"),  # math-verify's own unit list drops "more"
        ("x + 1", r"x + 1 \text{ squared}"),  # the same after an expression
        (r"\sqrt{2}", r"\sqrt{2}\text{ million}"),
        (r"5 \text{ minutes}", r"5 \text{ seconds}"),  # both have units: compared
        (r"5 \text{ cm}", r"5\text{ m}"),
        (r"3\text{ ft}^2", r"3 \text{ ft}"),
        (r"\$5", r"5 \text{ cents}"),
        (r"5\%", r"5^\circ"),
        ("7", r"7 \text{ thousand}"),
    ]
    right = [
        ("5", r"5\text{ cm}"),  # a unit, and the gold has none: dropped
        ("5", "5 feet"),
        ("5", r"5 \text{ units}"),
        (r"5\text{ minutes}", r"5\text{ min}"),  # spellings of one unit
        (r"15\mbox{ cm}^2", r"15 \text{ square centimeters}"),
        (r"\frac{270}7\text{ degrees}", r"\frac{270}{7}^\circ"),
        (r"\$32,\!348", r"32348 \text{ dollars}"),
        ("60", r"60 \text{ miles per hour}"),
        (r"5 \text{ minutes}", "5"),  # a bare value answers a gold with a unit
    ]
    assert _scores(reward, wrong) == [0.0] * len(wrong)
    assert _scores(reward, right) == [1.0] * len(right)
    out = reward([r"\boxed{5 \text{ thousand}}", r"\boxed{5\text{ s}}"], ["5", r"5\text{ h}"])
    assert out.metrics["reward/unit_or_word_mismatches"] == 2
    # A gold with a word that is not a unit is lossy: it pays its own text only.
    assert reward.classify_golds([r"5 \text{ thousand}"]) == [
        ("lossy", "words other than a final unit: 'thousand'")
    ]
    assert _scores(reward, [(r"5 \text{ thousand}", r"5\text{ thousand}"), (r"5 \text{ thousand}", "5")]) == [
        1,
        0,
    ]


def test_the_answer_is_the_outermost_last_box_whole(reward):
    assert last_boxed(r"\boxed{7 \cdot \boxed{5}}") == r"7 \cdot {5}"  # inner boxes unwrapped
    assert last_boxed(r"\boxed{1} and \boxed{2 + \fbox{3}} end") == "2 + {3}"
    assert last_boxed(r"\boxed{\boxed{5}}") == "5"
    assert last_boxed(r"\boxed{4} then \boxed{7 \cdot \boxed{5}") is None  # the outer box is cut off
    wrong = [
        ("5", r"7 \cdot \boxed{5}"),
        ("5", r"\boxed{5} + 1"),
        ("3", r"2 + \fbox{3}"),
        ("2", r"\boxed{2}^{2}"),
    ]
    right = [
        ("35", r"7 \cdot \boxed{5}"),
        ("6", r"\boxed{5} + 1"),
        ("5", r"\boxed{\boxed{5}}"),
        ("4", r"\boxed{2}^{2}"),
    ]
    assert _scores(reward, wrong) == [0.0] * len(wrong)
    assert _scores(reward, right) == [1.0] * len(right)


def test_where_a_window_would_cut_never_decides_the_answer(reward):
    # A box early, a later "####": the box is the answer however long the text between.
    for pad in (10, 10_000, 100_000):  # up to 700,000 characters
        completion = r"so \boxed{5}" + " filler" * pad + "\n#### 7"
        assert reward([completion, completion], ["5", "7"]).rewards.tolist() == [1.0, 0.0], pad
    # Too long to read whole: no answer (whatever its end says), counted.
    short = MathReward(max_completion_chars=1000, format_weight=0.5)
    try:
        out = short([r"\boxed{5}" + " x" * 600 + "\n#### 5", r"\boxed{5}"], ["5", "5"])
    finally:
        short.close()
    assert out.rewards.tolist() == [0.0, 1.5]
    assert out.metrics["reward/too_long_completions"] == 1
    assert out.metrics["reward/extraction_failures"] == 1
    assert extract_answer("#### 5" + " " * 50, max_chars=10) == (None, "too_long")
    assert FormatReward(max_completion_chars=10)(["x" * 20 + "\n#### 5"], ["5"]).rewards.tolist() == [0.0]


def test_lists_match_item_by_item_with_repeats(reward):
    wrong = [
        ("5", "5, 5"),  # the documented same-length rule
        ("5", r"\{5, 5\}"),
        ("5, 6, 6", "5, 5, 6"),  # same length, same set, other multiset
        ("1, 2", "1, 2, 2"),
        (r"1 \pm \sqrt{19}", r"1 + \sqrt{19}"),  # one of the two values
        ("x = 1, y = 2", "2, 1"),  # bare values answer assignments in their place only
        ("-2, 1", "-2, 1, 1"),
    ]
    right = [
        ("5, 6, 6", "6, 5, 6"),
        ("3, 5, 7", "7, 5, 3"),
        (r"1 \pm \sqrt{19}", r"1 - \sqrt{19}, 1 + \sqrt{19}"),
        (r"\{1\pm\sqrt{5},-2\}", r"-2, 1+\sqrt{5}, 1-\sqrt{5}"),
        ("x = 1, y = 2", "1, 2"),
        ("x = 1, y = 2", "y = 2, x = 1"),
        ("-2,1", r"1 \text{ and } -2"),
    ]
    assert _scores(reward, wrong) == [0.0] * len(wrong)
    assert _scores(reward, right) == [1.0] * len(right)


def test_digits_split_by_spaces_never_join(reward):
    wrong = [
        ("12", "1 2"),
        ("12", r"1\ 2"),
        ("123", "1~23"),
        ("12", r"1\,2"),
        ("1000", "1 000"),
        ("x = 12", "x = 1 2"),
    ]
    # Thousands separators: a comma or a thin space between groups of three digits.
    right = [("1000", "1,000"), ("1000", r"1\,000"), ("12345678", r"12\,345\,678"), ("58,500", "58500")]
    assert _scores(reward, wrong) == [0.0] * len(wrong)
    assert _scores(reward, right) == [1.0] * len(right)
    assert exact_number("1 2") is None and canonical_text("1 2") != canonical_text("12")
    assert reward.classify_golds(["1 2"]) == [("lossy", "digits separated by a space")]


def test_letter_case_is_significant(reward):
    wrong = [("2x", "2X"), ("x + y", "X + y"), (r"\text{(C)}", "(c)"), (r"\text{Evelyn}", r"\text{evelyn}")]
    right = [("2x", "x + x"), (r"\text{(C)}", "(C)"), ("2X", "2X")]
    assert _scores(reward, wrong) == [0.0] * len(wrong)
    assert _scores(reward, right) == [1.0] * len(right)


def test_false_negatives_fixed_and_documented(reward):
    seventy = "1" + "0" * 70
    fixed = [
        (r"\frac{1}{3}", r"0.\overline{3}"),  # repeating decimals are exact
        ("1/3", r"0.\overline{3}"),
        (r"\frac{7}{6}", r"1.1\overline{6}"),
        (r"x = \frac{1}{3}", r"x = 0.\overline{3}"),
        (seventy, "1e70"),  # long literals are exact numbers (up to 4000 digits)
        ("1e70", seventy),
        ("10^{70}", seventy),
    ]
    assert _scores(reward, fixed) == [1.0] * len(fixed)
    assert _scores(reward, [("0.333", r"0.\overline{3}"), (seventy, "1e69")]) == [0.0, 0.0]
    # Documented, not paid: a gold "x = 5" is a value; "2x = 10" does not state it.
    assert _scores(reward, [("x = 5", "2x = 10"), ("x + y = 3", "2x + 2y = 6")]) == [0.0, 1.0]


# --- properties: wrong answers built by each class's generator never pay ------------------

NON_UNIT_WORDS = [
    "thousand",
    "million",
    "squared",
    "cubed",
    "below zero",
    "more",
    "less",
    "apples",
    "times",
    "k",
    "x",
]
UNIT_WORDS = [
    "cm",
    "m",
    "feet",
    "inches",
    "minutes",
    "seconds",
    "hours",
    "dollars",
    "cents",
    "degrees",
    "kg",
    "units",
]
SMALL = st.integers(-999, 999)


@st.composite
def worded_answers(draw):
    """``(gold, answer, pays)``: a number followed by a random word, with or without \\text."""
    a = draw(SMALL)
    word = draw(st.sampled_from(NON_UNIT_WORDS + UNIT_WORDS))
    form = draw(st.sampled_from([r"{a} \text{{ {w}}}", r"{a}\,\text{{{w}}}", r"\text{{{a} {w}}}"]))
    pred = form.format(a=a, w=word)
    gold_unit = draw(st.sampled_from([None, *UNIT_WORDS]))
    gold = str(a) if gold_unit is None else rf"{a} \text{{ {gold_unit}}}"
    known = word in UNIT_WORDS
    pays = known and (gold_unit is None or split_answer(pred).unit == split_answer(gold).unit)
    return gold, pred, pays


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cases=st.lists(worded_answers(), min_size=4, max_size=8), shift=st.integers(1, 50))
def test_words_after_numbers_pay_only_as_units(reward, cases, shift):
    golds = [gold for gold, _, _ in cases]
    # the same answers with the number shifted: always wrong
    shifted = [gold.replace(str(exact_number(gold)), str(exact_number(gold) + shift), 1) for gold in golds]
    preds = [pred for _, pred, _ in cases]
    out = reward([rf"\boxed{{{p}}}" for p in preds * 2], golds + shifted).rewards.tolist()
    assert out[: len(cases)] == [float(pays) for _, _, pays in cases]
    assert out[len(cases) :] == [0.0] * len(cases)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(a=st.integers(1, 999), k=st.integers(2, 99), depth=st.integers(1, 3))
def test_a_nested_box_is_never_graded_alone(reward, a, k, depth):
    inner = str(a)
    for _ in range(depth):
        inner = rf"\boxed{{{inner}}}"
    forms = [rf"{k} \cdot {inner}", rf"{inner} + {k}", rf"{inner}^{{{k}}}" if a > 1 else rf"{inner} - {k}"]
    completions = [rf"\boxed{{{form}}}" for form in forms]
    assert reward(completions, [str(a)] * 3).rewards.tolist() == [0.0] * 3
    values = [k * a, a + k, a**k if a > 1 else a - k]
    assert reward(completions[:2], [str(v) for v in values[:2]]).rewards.tolist() == [1.0, 1.0]


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    items=st.lists(st.integers(-50, 50), min_size=2, max_size=5, unique=True),
    data=st.data(),
)
def test_repeated_list_items_never_pay(reward, items, data):
    gold = ", ".join(map(str, items))
    src, dst = data.draw(st.lists(st.integers(0, len(items) - 1), min_size=2, max_size=2, unique=True))
    repeated = list(items)
    repeated[dst] = items[src]  # one item replaced by a copy of another: same length, fewer values
    extra = [*items, items[src]]  # one item written twice
    order = data.draw(st.permutations(items))
    preds = [
        ", ".join(map(str, repeated)),
        ", ".join(map(str, extra)),
        rf"\{{{', '.join(map(str, extra))}\}}",
    ]
    out = reward([rf"\boxed{{{p}}}" for p in [*preds, ", ".join(map(str, order))]], [gold] * 4)
    assert out.rewards.tolist() == [0.0, 0.0, 0.0, 1.0]


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    n=st.integers(10, 10**7),
    data=st.data(),
    gap=st.sampled_from([" ", "  ", r"\ ", "~", r"\;", r"\quad "]),
)
def test_digits_split_by_spaces_never_pay(reward, n, data, gap):
    digits = str(n)
    cut = data.draw(st.integers(1, len(digits) - 1))
    split = digits[:cut] + gap + digits[cut:]
    golds = [digits, digits[:cut] + digits[cut:].lstrip("0") or "0", f"x = {digits}"]
    preds = [split, split, f"x = {split}"]
    assert _scores(reward, list(zip(golds, preds, strict=True))) == [0.0] * 3
