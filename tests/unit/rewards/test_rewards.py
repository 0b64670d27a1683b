"""Rewards: answer extraction, math-verify checks on real data, and robustness bounds."""

import pickle
import threading
import time

import pytest

from egspo.data.records import load_examples
from egspo.rewards import FormatReward, MathReward, RewardFunction, RewardOutput, VerifierPool
from egspo.rewards.extraction import (
    after_hash_marker,
    extract_answer,
    has_final_marker,
    last_boxed,
    last_number,
)
from egspo.rewards.numeric import canonical_number, canonical_text, exact_number, has_spaced_digits
from egspo.rewards.units import split_answer


@pytest.fixture(scope="module")
def reward():
    r = MathReward(timeout_seconds=1.0, num_workers=2)
    yield r
    r.close()


# --- extraction -------------------------------------------------------------------------


def test_last_boxed_balanced_and_truncated():
    assert last_boxed(r"a \boxed{1} b \boxed{\frac{1}{2}} c") == r"\frac{1}{2}"
    assert last_boxed(r"\boxed{\left\{ 1, 2 \right\}}") == r"\left\{ 1, 2 \right\}"
    # The last box is the answer: cut off, empty or without a brace, there is none.
    assert last_boxed(r"\boxed{7} then \boxed{\frac{3}{") is None
    assert last_boxed(r"\boxed{7} then \boxed{ }") is None
    assert last_boxed(r"\boxed{7} then \boxed 8") is None
    assert last_boxed(r"\fbox{12}") == "12"
    assert last_boxed("no box here") is None


def test_hash_marker_and_last_number():
    assert after_hash_marker("12 + 3 = 15\n#### 15\n") == "15"
    assert after_hash_marker("#### \n") is None
    assert last_number("costs 1,234.5 then 17 and 2,000 apples") == "2,000"
    assert last_number("nothing") is None
    # A fragment of a larger expression is never read as the answer.
    for text in ("So the answer is 2^{10}.", "x_3", r"$\frac{1}{2}$", "it is 3/4"):
        assert last_number(text) is None, text


def test_extract_answer_the_last_box_then_the_hash_line():
    assert extract_answer(r"#### 3 but \boxed{4}") == ("4", "boxed")
    # a box wins over a later "####" (also a markdown heading)
    assert extract_answer("\\boxed{4}\n#### Check\nok") == ("4", "boxed")
    assert extract_answer("x = 5\n#### 6\nthen 7") == ("6", "hash")
    assert extract_answer(r"#### 6 then \boxed{}") == (None, "none")
    assert extract_answer("2+3=5, so \\boxed{}", number_fallback=True) == (None, "none")
    # The last-number fallback is opt-in and only for text without any marker.
    assert extract_answer("it is 8 or 9") == (None, "none")
    assert extract_answer("it is 8 or 9", number_fallback=True) == ("9", "number")
    assert extract_answer("####\nit is 9", number_fallback=True) == (None, "none")
    assert extract_answer("no answer", number_fallback=True) == (None, "none")


def test_canonical_number():
    assert canonical_number("1,450,000")[0] == canonical_number("1450000")[0]
    assert canonical_number("0.50")[0] == canonical_number(r"\frac{1}{2}")[0] == canonical_number("1/2")[0]
    assert canonical_number(r"\$18.")[0] == "18"
    assert canonical_number("-007") == ("-7", True)
    assert canonical_number("x + 1") is None
    assert canonical_number(r"\frac{1}{0}") is None
    # Units that do not change a number, scientific notation, a number in \text{}.
    assert canonical_number(r"-4\%") == canonical_number("-4") == ("-4", True)
    assert canonical_number(r"90^\circ") == ("90", True)
    assert canonical_number("4.5e33") == canonical_number(r"4.5 \times 10^{33}") == ("45" + "0" * 32, True)
    assert canonical_number(r"2.5\cdot10^{-3}") == ("1/400", False)
    assert canonical_number(r"\text{265}") == canonical_number("265.0") == ("265", True)
    # Lists are not numbers with thousands commas.
    assert canonical_number("1, 234") is None
    assert canonical_number("0,234") is None
    huge = "9" * 10_000  # compared as a digit string, never converted to int
    assert canonical_number(huge) == (huge, True)


def test_final_marker():
    assert has_final_marker("12 + 3 = 15\n#### 15")
    assert has_final_marker("So the answer is $\\boxed{15}$.\n\n")
    assert not has_final_marker("#### 15\nmore text after")
    assert not has_final_marker("The answer is 15")


# --- correctness on real data ------------------------------------------------------------


def test_gsm8k_reference_solutions_score_one(reward, gsm8k_test_path):
    examples = load_examples(str(gsm8k_test_path))
    assert len(examples) == 1319
    start = time.perf_counter()
    out = reward([e.response for e in examples], [e.answer for e in examples])
    right_seconds = time.perf_counter() - start
    assert isinstance(out, RewardOutput)
    assert out.rewards.shape == (len(examples),)
    assert out.rewards.min().item() == 1.0
    assert out.metrics["reward/accuracy"] == 1.0
    # Integers are decided in-process: no sample needs a math-verify worker.
    assert out.metrics["reward/verifier_calls"] == 0

    wrong = [f"{e.response.rsplit('####', 1)[0]}#### {int(e.answer) + 1}" for e in examples]
    out = reward(wrong, [e.answer for e in examples])
    assert out.rewards.max().item() == 0.0
    assert right_seconds < 60


def test_math500_reference_solutions_score_one(reward, math500_path):
    examples = load_examples(str(math500_path))
    assert len(examples) == 500
    start = time.perf_counter()
    out = reward([e.response for e in examples], [e.answer for e in examples])
    seconds = time.perf_counter() - start
    accuracy = out.metrics["reward/accuracy"]
    print(f"MATH-500 reference self-consistency: {accuracy:.1%} in {seconds:.1f} s")
    assert accuracy >= 0.98
    assert out.metrics["reward/unparsable_gold"] == 0
    assert seconds < 60

    # Against the gold of the next problem, almost nothing matches (coincidences like 3 == 3).
    shifted = [e.answer for e in examples[1:] + examples[:1]]
    out = reward([e.response for e in examples], shifted)
    assert out.metrics["reward/accuracy"] < 0.05


def test_symbolic_equivalence_goes_through_math_verify(reward):
    out = reward(
        [r"\boxed{\frac{\sqrt{2}}{2}}", r"\boxed{x = 5}", r"\boxed{2\pi}", r"\boxed{(1, 2)}"],
        [r"\frac{1}{\sqrt{2}}", "5", r"\pi \cdot 2", r"(2, 1)"],
    )
    assert out.rewards.tolist() == [1.0, 1.0, 1.0, 0.0]


# --- gold answers that do not parse ------------------------------------------------------


@pytest.mark.parametrize("gold", ["", "???", r"\frac{", "   "])
def test_unparsable_gold_never_scores(reward, gold):
    for _ in range(2):  # the second call is answered from the cache
        out = reward([f"\\boxed{{{gold}}}", f"#### {gold}", gold], [gold] * 3)
        assert out.rewards.tolist() == [0.0, 0.0, 0.0]
        assert out.metrics["reward/unparsable_gold"] == 3


# --- robustness: bounded time, no crash -------------------------------------------------


ADVERSARIAL = {
    "one_megabyte": "The answer is " + "1234567890 " * 100_000,
    "one_megabyte_boxes": "\\boxed{" * 150_000,
    # Under max_answer_chars (1000), so these reach math-verify.
    "nested_braces": "\\boxed{" + "{" * 450 + "1" + "}" * 450 + "}",
    "nested_fracs": "\\boxed{" + "\\frac{" * 80 + "1}{2}" * 80 + "}",
    "nested_sqrt": "\\boxed{" + "\\sqrt{" * 140 + "2" + "}" * 140 + "}",
    "huge_exponent": "\\boxed{9^{9^{9^{9}}}}",
    "huge_factorial": "\\boxed{(10^{100})!}",
    "junk": bytes(range(256)).decode("latin-1") * 40 + "\\boxed{\\\\}}}{{\x00}",
}


@pytest.mark.parametrize("name", sorted(ADVERSARIAL))
def test_adversarial_completion_scores_zero_in_bounded_time(reward, name):
    start = time.perf_counter()
    out = reward([ADVERSARIAL[name]], ["5"])
    seconds = time.perf_counter() - start
    assert out.rewards.tolist() == [0.0]
    # 1 s per-sample deadline, plus a worker restart and start-up at most.
    assert seconds < 6, f"{name} took {seconds:.1f} s"


def test_deep_nesting_without_length_cap_is_bounded():
    # 3000 nested braces take math-verify's parser many seconds; the deadline cuts it short.
    # (Braces around the whole answer are unwrapped first, so the nest is one term of a sum.)
    reward = MathReward(timeout_seconds=1.0, num_workers=1, max_answer_chars=10**6)
    try:
        start = time.perf_counter()
        out = reward(["\\boxed{" + "{" * 3000 + "1" + "}" * 3000 + " + 1}"], ["2"])
        seconds = time.perf_counter() - start
    finally:
        reward.close()
    assert out.rewards.tolist() == [0.0]
    assert out.metrics["reward/verify_timeouts"] == 1
    assert seconds < 6


def test_huge_exponent_is_counted_as_timeout(reward):
    out = reward([r"\boxed{9^{9^{9^{9}}}}", r"\boxed{5}"], ["7", "5"])
    assert out.rewards.tolist() == [0.0, 1.0]
    assert out.metrics["reward/verify_timeouts"] == 1


@pytest.mark.parametrize(
    "text",
    [
        "5" + "\\," * 100_000,
        "5" + "~" * 200_000,
        "5" + "." * 200_000,
        "1 " + "a" * 200_000,
        "\\text{" * 30_000,
    ],
    ids=["spacing-commands", "tildes", "periods", "letters", "open-text-commands"],
)
def test_answer_reading_is_linear_on_long_answers(text):
    # maj@k keys read answers of any length (the reward caps them at max_answer_chars first)
    start = time.perf_counter()
    for fn in (split_answer, exact_number, has_spaced_digits, canonical_text):
        fn(text)
    assert time.perf_counter() - start < 3.0


def test_long_completion_keeps_its_final_answer(reward):
    completion = "blah " * 200_000 + "\n#### 42"
    out = reward([completion], ["42"])
    assert out.rewards.tolist() == [1.0]


def test_hard_deadline_kills_stuck_worker_and_pool_recovers():
    # soft_fraction > 1: the worker's own timer never fires first, so the parent must kill it.
    pool = VerifierPool(num_workers=1, timeout_seconds=1.0, soft_fraction=10.0)
    try:
        start = time.perf_counter()
        results = pool.run([(r"9^{9^{9^{9}}}", "7"), (r"\frac{2}{4}", "0.5")])
        assert time.perf_counter() - start < 10
        assert results[0].status == "timeout" and not results[0].correct
        assert results[1].status == "ok" and results[1].correct and results[1].gold == "ok"
        assert pool.restarts == 1
    finally:
        pool.close()


def test_works_from_a_thread(reward):
    box = {}

    def run():
        box["out"] = reward([r"\boxed{\dfrac{6}{8}}", r"\boxed{\sqrt{4}}"], ["3/4", r"2"])

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(timeout=30)
    assert box["out"].rewards.tolist() == [1.0, 1.0]


# --- interface ----------------------------------------------------------------------------


def test_metrics_and_format_weight():
    completions = ["3 + 4 = 7\n#### 7", "the result is 7", "#### 8", "nothing"]
    reward = MathReward(format_weight=0.5)
    try:
        out = reward(completions, ["7"] * 4)
    finally:
        reward.close()
    assert out.rewards.tolist() == [1.5, 0.0, 0.5, 0.0]
    assert out.metrics["reward/accuracy"] == 0.25
    assert out.metrics["reward/format"] == 0.5
    assert out.metrics["reward/extraction_failures"] == 2
    assert out.metrics["reward/mean"] == pytest.approx(0.5)
    # With the opt-in fallback, the bare "7" counts.
    fallback = MathReward(format_weight=0.5, number_fallback=True)
    assert fallback(completions, ["7"] * 4).rewards.tolist() == [1.5, 1.0, 0.5, 0.0]


def test_format_reward():
    out = FormatReward()(["a\n#### 3", r"so $\boxed{x}$", "3", "#### 3\nand more"], ["3"] * 4)
    assert out.rewards.tolist() == [1.0, 1.0, 0.0, 0.0]
    assert out.metrics["reward/format"] == 0.5


def test_length_mismatch_and_pickle(reward):
    with pytest.raises(ValueError, match="2 completions but 1 answers"):
        reward(["1", "2"], ["1"])
    clone = pickle.loads(pickle.dumps(reward))
    try:
        assert clone([r"\boxed{\frac{1}{3}}"], [r"\dfrac{1}{3}"]).rewards.tolist() == [1.0]
    finally:
        clone.close()


def test_rewards_are_configurable_by_class_path():
    import jsonargparse

    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    parser.add_argument("--reward", type=RewardFunction)
    for class_path, args in [
        ("egspo.rewards.MathReward", {"format_weight": 0.1}),
        ("egspo.rewards.FormatReward", {}),
    ]:
        config = parser.parse_object({"reward": {"class_path": class_path, "init_args": args}})
        reward = parser.instantiate(config).reward
        assert isinstance(reward, RewardFunction)
        assert reward(["#### 3"], ["3"]).rewards.tolist()[0] >= 1.0
        reward.close()


@pytest.mark.parametrize(
    "options, message",
    [
        ({"num_workers": 0}, "num_workers must be >= 1, got 0"),
        ({"num_workers": -2}, "num_workers must be >= 1, got -2"),
        ({"timeout_seconds": 0}, "timeout_seconds must be > 0"),
        ({"rel_tol": 1.0}, r"rel_tol must be in \[0, 1\)"),
    ],
)
def test_math_reward_refuses_bad_options_when_built(options, message):
    """Refused in the constructor, so the config check names the option before any model loads
    (not at the first reward call, when the worker pool starts)."""
    with pytest.raises(ValueError, match=message):
        MathReward(**options)
