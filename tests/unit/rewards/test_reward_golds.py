"""The math reward on every real gold answer: each scores 1 boxed, and wrong variants score 0.

A wrong variant of a gold: gold + 1 (numeric golds), the negated answer (for a list or
tuple, its first item negated; for an equation, its right-hand side), and the answer with
its last term or item dropped (where it has several). The gold audit must flag every gold
that cannot be verified in full.
"""

import re
import time
from fractions import Fraction

import pytest

from egspo.data.records import load_examples
from egspo.rewards import MathReward, VerifierPool, audit_golds
from egspo.rewards.numeric import exact_number

# MATH-500 golds in another base: latex2sympy keeps the digits and drops the base, so they
# are "lossy" and pay only their own text.
MATH500_LOSSY = {"52_8", "40_9", "2516_8", "4210_{5}", "204_5", "4343_6"}


@pytest.fixture(scope="module")
def reward():
    r = MathReward(timeout_seconds=3.0, num_workers=2)
    yield r
    r.close()


def _golds(path) -> list[str]:
    return [e.answer.strip() for e in load_examples(str(path))]


def _split_top(text: str, separators: str) -> list[str]:
    """Pieces of ``text`` between separators outside brackets (+ and - stay with their term)."""
    depth, pieces = 0, [""]
    for ch in text:
        depth += (ch in "{([") - (ch in "})]")
        before = pieces[-1].rstrip()
        if depth == 0 and ch in separators and before and not before.endswith(("^", "_", "\\pm", "\\")):
            pieces.append(ch if ch in "+-" else "")
        else:
            pieces[-1] += ch
    return pieces


def _latex(value: Fraction) -> str:
    if value.denominator == 1:
        return str(value.numerator)
    return ("-" if value < 0 else "") + f"\\frac{{{abs(value.numerator)}}}{{{value.denominator}}}"


def _negated(text: str) -> str:
    return f"-\\left({text}\\right)"


def wrong_variants(gold: str) -> dict[str, str]:
    """Wrong answers built from ``gold`` by kind: "plus_one", "negated", "dropped"."""
    value = exact_number(gold)
    if isinstance(value, Fraction):
        return {"plus_one": _latex(value + 1)} | ({"negated": _latex(-value)} if value else {})
    matrix = re.fullmatch(r"\\begin\{(pmatrix|bmatrix)\}(.*)\\end\{\1\}", gold, re.S)
    if matrix:
        env, rows = matrix.group(1), matrix.group(2).split("\\\\")
        out = {"negated": "-" + gold}
        if len(rows) > 1:
            out["dropped"] = f"\\begin{{{env}}}" + "\\\\".join(rows[:-1]) + f"\\end{{{env}}}"
        return out
    bracket = re.fullmatch(r"(\\left)?([(\[])(.*)(\\right)?([)\]])", gold, re.S)
    if bracket and len(_split_top(gold, "\\")) == 1 and "\\cup" not in gold:  # a tuple or an interval
        items = _split_top(bracket.group(3), ",")
        if len(items) > 1:
            start = (bracket.group(1) or "") + bracket.group(2)
            end = (bracket.group(4) or "") + bracket.group(5)
            out = {"negated": start + ",".join([_negated(items[0]), *items[1:]]) + end}
            if bracket.group(2) + bracket.group(5) == "()":
                out["dropped"] = start + ",".join(items[:-1]) + end
            return out
    items = _split_top(gold, ",")
    if len(items) > 1:
        return {"negated": ",".join([_negated(items[0]), *items[1:]]), "dropped": ",".join(items[:-1])}
    sides = _split_top(gold, "=")
    if len(sides) == 2:
        lhs, rhs = sides
        out = {} if rhs.strip() == "0" else {"negated": f"{lhs}={_negated(rhs)}"}  # -(0) = 0
        left, right = _split_top(lhs, "+-"), _split_top(rhs, "+-")
        if len(right) > 1:
            out["dropped"] = lhs + "=" + "".join(right[:-1])
        elif len(left) > 1:
            out["dropped"] = "".join(left[:-1]) + "=" + rhs
        return out
    out = {"negated": _negated(gold)}
    terms = _split_top(gold, "+-")
    if len(terms) > 1 and terms[0].strip():
        out["dropped"] = "".join(terms[:-1])
    return out


def _check_golds(reward, golds: list[str]) -> dict:
    """Every gold boxed scores 1 unless the audit flags it unparsable; every wrong variant
    scores 0. Returns counts for the report."""
    audit = audit_golds(golds, reward)
    out = reward([f"\\boxed{{{g}}}" for g in golds], golds)
    scores = out.rewards.tolist()
    not_paid = [
        g for g, s, flag in zip(golds, scores, audit.flags, strict=True) if s != 1.0 and flag != "unparsable"
    ]
    assert not not_paid, f"golds that do not pay their own boxed text: {not_paid}"
    assert sum(scores) == len(golds) - audit.unparsable

    # The parse path, not only the text shortcut: each verifiable gold matches itself.
    distinct = dict(zip(golds, audit.flags, strict=True))
    symbolic = [g for g, flag in distinct.items() if flag == "ok" and exact_number(g) is None]
    pool = VerifierPool(num_workers=2, timeout_seconds=3.0)
    try:
        results = pool.run([(g, g) for g in symbolic])
    finally:
        pool.close()
    assert [g for g, r in zip(symbolic, results, strict=True) if not r.correct] == []

    completions, targets, kinds = [], [], []
    for gold in distinct:
        for kind, wrong in wrong_variants(gold).items():
            completions.append(f"\\boxed{{{wrong}}}")
            targets.append(gold)
            kinds.append(kind)
    out = reward(completions, targets)
    paid = [
        (k, g, c) for k, g, c, s in zip(kinds, targets, completions, out.rewards.tolist(), strict=True) if s
    ]
    assert paid == []
    return {
        "golds": len(golds),
        "distinct": len(distinct),
        "paid": int(sum(scores)),
        "lossy": audit.lossy,
        "unparsable": audit.unparsable,
        "symbolic_self_checks": len(symbolic),
        "variants": {kind: kinds.count(kind) for kind in sorted(set(kinds))},
        "variants_unparsable": out.metrics["reward/unparsable_answers"],
        "lossy_golds": sorted(g for g, flag in distinct.items() if flag == "lossy"),
    }


@pytest.mark.slow
def test_math500_golds_pay_themselves_and_never_a_wrong_variant(reward, math500_path):
    start = time.perf_counter()
    report = _check_golds(reward, _golds(math500_path))
    print(f"MATH-500: {report} in {time.perf_counter() - start:.1f} s")
    assert report["unparsable"] == 0
    assert set(report["lossy_golds"]) == MATH500_LOSSY
    # the variants are real wrong answers, not strings that merely fail to parse
    assert report["variants_unparsable"] <= 10


def test_gsm8k_golds_pay_themselves_and_never_a_wrong_variant(reward, gsm8k_test_path):
    report = _check_golds(reward, _golds(gsm8k_test_path))
    print(f"GSM8K test: {report}")
    assert report["unparsable"] == report["lossy"] == 0


def test_audit_of_gsm8k_train_is_instant_and_clean(gsm8k_train_path):
    golds = [e.answer for e in load_examples(str(gsm8k_train_path))]
    reward = MathReward()
    try:
        audit = audit_golds(golds, reward)
    finally:
        reward.close()
    print(f"GSM8K train audit: {len(golds)} golds, {audit.distinct} distinct, {audit.seconds * 1000:.1f} ms")
    assert len(golds) == 7473 and audit.flags == ["ok"] * len(golds)
    assert audit.seconds < 1.0  # plain numbers never reach a worker
    assert audit.metrics() == {"data/gold_total": 7473.0, "data/gold_unparsable": 0.0, "data/gold_lossy": 0.0}


def test_audit_reports_counts_examples_and_flags_per_gold():
    golds = ["5", r"\{x|-2\leq x < 1\}", "N=n", "52_8", "52_8", r"\frac{\sqrt{2}}{2}", ""]
    audit = audit_golds(golds, max_examples=1)
    assert audit.flags == ["ok", "unparsable", "lossy", "lossy", "lossy", "ok", "unparsable"]
    assert audit.ok == [True, False, False, False, False, True, False]
    assert (audit.unparsable, audit.lossy, audit.distinct) == (2, 3, 6)
    assert audit.unparsable_examples == [(r"\{x|-2\leq x < 1\}", "math-verify cannot parse it")]
    assert [gold for gold, _ in audit.lossy_examples] == ["N=n"]
    assert "2 unparsable" in audit.summary() and "3 lossy" in audit.summary()
