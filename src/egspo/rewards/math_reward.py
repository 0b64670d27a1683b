"""Correctness reward for math answers, checked with math-verify under a hard time bound."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal

import torch

from egspo.rewards.base import RewardFunction, RewardOutput
from egspo.rewards.extraction import MAX_COMPLETION_CHARS, extract_answer, has_final_marker
from egspo.rewards.numeric import canonical_text, exact_number, has_spaced_digits, repeating_to_fraction
from egspo.rewards.units import AnswerParts, letter_case_differs, split_answer
from egspo.rewards.verifier import GoldStatus, VerifierPool, VerifyResult


def _as_latex(value: Fraction | str) -> str:
    """A plain number as LaTeX that math-verify reads one way only."""
    if isinstance(value, str) or value.denominator == 1:
        return str(value)
    sign = "-" if value < 0 else ""
    return f"{sign}\\frac{{{abs(value.numerator)}}}{{{value.denominator}}}"


@dataclass(frozen=True)
class _Gold:
    """A gold answer as the reward reads it: its text, its unit split, its exact value when it
    is a plain number, why it is lossy when that is decided here, and the text the workers get."""

    text: str
    parts: AnswerParts
    value: Fraction | str | None
    lossy_reason: str
    worker_text: str

    @classmethod
    def read(cls, gold: str) -> _Gold:
        parts = split_answer(gold)
        reason = ""
        if parts.words:
            reason = f"words other than a final unit: {parts.words!r}"
        elif has_spaced_digits(gold):
            reason = "digits separated by a space"
        value = None if reason else exact_number(gold)
        worker_text = _as_latex(value) if value is not None else repeating_to_fraction(parts.core)
        return cls(gold, parts, value, reason, worker_text)


def _numbers_equal(pred: Fraction | str, gold: Fraction | str, rel_tol: float) -> bool:
    """Exact equality, or ``|pred - gold| <= rel_tol * |gold|``; numbers too long to convert
    (digit strings) are equal only digit for digit."""
    if isinstance(pred, str) or isinstance(gold, str):
        return pred == gold
    if rel_tol == 0:
        return pred == gold
    return abs(pred - gold) <= Fraction(rel_tol) * abs(gold)


# How a worker result decides a sample: "verify" a (prediction, gold) pair; "text": the
# prediction is the gold's own text, right unless the gold is unparsable; "gold": no
# prediction, the result only classifies the gold.
_Use = Literal["verify", "text", "gold"]
# A worker request and cache key: ``(prediction or None, gold)`` as the workers read them.
_Key = tuple[str | None, str]


@dataclass
class _Scores:
    """Per-sample outcome of one call, filled in by the fast path or by a worker result."""

    correct: list[float]
    gold: list[GoldStatus | None]
    status: list[str]
    unparsed: list[bool]  # an answer math-verify cannot read in full
    extraction_failures: int = 0
    too_long: int = 0
    mismatches: int = 0  # a word that is not a unit, or another unit than the gold's

    def apply(self, i: int, result: VerifyResult, use: _Use) -> None:
        self.status[i] = result.status
        if result.status != "ok":
            return
        self.gold[i] = result.gold
        if use == "text":
            self.correct[i] = float(result.gold != "unparsable")
        elif use == "verify":
            self.unparsed[i] = result.gold == "ok" and not result.pred_parsed
            self.correct[i] = float(result.correct and result.gold == "ok")

    def decide_here(self, i: int, pred: str | None, gold: _Gold, rel_tol: float) -> tuple[_Key, _Use] | None:
        """Decide sample ``i`` in this process where the policy can (``MathReward``'s fast path);
        else return the worker request that decides it. None: decided here."""
        same_text = pred is not None and canonical_text(pred) == canonical_text(gold.text)
        if gold.lossy_reason:  # decided here: pays only its own text
            self.gold[i] = "lossy"
            self.correct[i] = float(same_text)
            return None
        if gold.value is not None:
            self.gold[i] = "ok"
        key, use = (None, gold.worker_text), "gold"  # default: only classify the gold
        if same_text:
            key, use = (None, gold.worker_text), "text"
            if gold.value is not None:
                self.correct[i] = 1.0
                return None
        elif pred is not None:
            parts = split_answer(pred)
            if parts.words or (parts.unit and gold.parts.unit and parts.unit != gold.parts.unit):
                self.mismatches += 1  # a word that is not a unit, or another unit: not equal
            elif has_spaced_digits(pred):
                self.unparsed[i] = True  # "1 2" is no number
            else:
                pred_value = exact_number(pred)
                if gold.value is not None and pred_value is not None:
                    self.correct[i] = float(_numbers_equal(pred_value, gold.value, rel_tol))
                    return None
                if not letter_case_differs(parts.core, gold.parts.core):
                    key, use = (repeating_to_fraction(parts.core), gold.worker_text), "verify"
        if gold.value is not None and use != "verify":
            return None  # a plain-number gold needs no worker to be classified
        return key, use

    def counts(self) -> dict[str, float]:
        """The call's counters, ready to log."""
        return {
            "reward/unparsable_gold": float(self.gold.count("unparsable")),
            "reward/lossy_gold": float(self.gold.count("lossy")),
            "reward/extraction_failures": float(self.extraction_failures),
            "reward/too_long_completions": float(self.too_long),
            "reward/unit_or_word_mismatches": float(self.mismatches),
            "reward/unparsable_answers": float(sum(self.unparsed)),
            "reward/verify_errors": float(self.status.count("error")),
            "reward/verify_timeouts": float(self.status.count("timeout")),
            "reward/budget_exhausted": float(self.status.count("budget")),
        }


class MathReward(RewardFunction):
    """``reward = correct + format_weight * format`` per completion.

    ``correct`` is 1 only when the completion's final answer equals the gold answer. The
    policy, chosen so that a wrong answer is never paid:

    - **Final answer.** The whole content of the outermost last ``\\boxed{}`` (or ``\\fbox{}``):
      a box inside it is part of the answer (``\\boxed{7 \\cdot \\boxed{5}}`` answers 35, not
      5). In a completion without any box command, the text after the last ``####`` on its
      line (GSM8K). If the last box is empty or broken (cut off before its closing brace),
      there is no answer: earlier boxes and numbers are never consulted. The last-number
      fallback is off unless ``number_fallback=True``, and even then it applies only to
      completions without any marker, and only to a number that stands alone (never the
      ``10`` of ``2^{10}``). The whole completion is read (extraction is linear); one longer
      than ``max_completion_chars`` has no answer and no format bonus, counted in
      ``reward/too_long_completions``: no window decides which marker is the last.
    - **Units and words.** Only known unit words (``units._UNIT_SPELLINGS``: lengths,
      areas, volumes, times, masses, money, speeds, ``\\%``, degrees) are units, at the end of
      the answer: in a text command (``5\\text{ cm}^2``), as a symbol (``\\%``, ``^\\circ``,
      a leading ``\\$``), or bare when unambiguous (``5 feet``; a bare ``cm`` is a product of
      variables). A unit is dropped only when the gold has none; a gold with a unit is
      answered by the bare value; when both have units, the units must be the same unit
      (spellings agree: ``min`` = ``minutes``, ``square feet`` = ``ft^2``; no conversion,
      ``300 s`` is not ``5 min``). Any other word (``5\\text{ thousand}``, ``x+1\\text{
      squared}``, ``\\text{5 apples}``, ``5\\text{ more}``) makes the answer equal to no bare
      number or expression (``reward/unit_or_word_mismatches``); a gold with such a word is
      "lossy". math-verify's own unit stripping is off. A unit is read at the end of the
      whole answer only: in ``5\\text{ cm}, 6\\text{ cm}`` the first ``cm`` is a word (a
      documented false negative against ``5, 6``).
    - **Numbers** (integers, decimals, repeating decimals ``0.\\overline{3}``, ``a/b``,
      ``\\frac{a}{b}``, ``4.5e33``, ``4.5\\times10^{33}``, optionally in ``\\text{}``) are compared
      exactly: ``0.5`` equals ``1/2``, ``0.\\overline{3}`` equals ``1/3``, ``1e70`` equals its
      71-digit literal, but ``0.3333333`` is not ``1/3`` and ``3.1415927`` is not ``\\pi``.
      Thousands separators are a comma or a thin space between groups of three digits
      (``1,234``, ``1\\,234``); ``1, 234`` is a list. Any other space between two digits
      separates them: ``1 2`` is not 12, and an answer written so scores 0
      (``reward/unparsable_answers``). ``rel_tol > 0`` accepts ``|pred - gold| <= rel_tol *
      |gold|`` for scalar answers. Other expressions are compared by math-verify (sympy
      simplification, then numerically to 60 significant digits), decimals in them exactly.
    - **Letter case** is significant: ``2X`` is not ``2x``, ``(c)`` is not ``(C)`` (latex2sympy
      folds case; the reward refuses a letter that appears in only the other case).
    - **Relations** are compared whole (math-verify: equivalent equations and inequalities
      match, ``2x + 2y = 6`` answers ``x + y = 3``). An equation answers a bare gold value
      only as ``variable = value``: ``x = 5`` answers 5, ``6 = 5``, ``2x = 10`` and ``x > 5``
      do not, and every link of ``x = 2 + 3 = 5`` must hold. Symmetrically, a gold ``x = 5``
      (an assignment: a value) is answered by ``5`` or ``x = 5``, not by ``2x = 10``, which
      does not state the value.
    - **Lists** (top-level commas, semicolons, "and"/"or", a whole-answer set ``\\{...\\}``)
      match only a gold with as many items, item by item as multisets: ``5, 5`` is not 5,
      ``5, 5, 6`` is not ``5, 6, 6``; the order is free, a ``\\pm`` item counts as its two
      values, and a bare value answers an ``x = 1`` item only in its place. A tuple or an
      interval is one item, compared in order.
    - **Golds** are classified once. "unparsable" golds never pay: math-verify cannot read
      them as LaTeX (a set-builder ``\\{x | -2 \\leq x < 1\\}``, ``x \\neq \\pm 5``; its
      number search used to read these as 1 and 5, which is not done here). "lossy" golds
      parse but lose meaning: ``N = n`` (latex2sympy makes both letters one symbol), ``52_8``
      (the base is dropped), a word that is not a unit, digits split by a space, a vanished
      relation sign or letter; such a gold pays only a prediction whose canonical text is
      the gold's own, never one that matches what was left of it. ``audit_golds`` reports
      both when data loads. Answers are parsed the same way; one that is lossy or
      unparsable scores 0 (``reward/unparsable_answers``).

    Fast path, in this process: two plain numbers are decided here (after the unit and word
    checks), and a prediction whose canonical text is the gold's is accepted unless the
    gold is unparsable. Everything else goes to math-verify in worker processes
    (``VerifierPool``), each sample bounded by ``timeout_seconds`` of wall time and the
    whole call by ``batch_timeout_seconds``; results are cached by ``(prediction, gold)``.
    An answer longer than ``max_answer_chars`` counts as an extraction failure. A verifier
    error, timeout or spent budget gives 0 and is counted.

    ``format`` is 1 when the last line holds ``#### X`` or ``\\boxed{X}`` (see FormatReward).

    Args:
        timeout_seconds: wall-time limit of one sample's verification.
        format_weight: weight of the format bonus.
        num_workers: verifier processes (parallel verification of a batch).
        max_completion_chars: longest completion read (whole); a longer one has no answer.
        max_answer_chars: longest answer (and gold) that is verified.
        cache_size: ``(prediction, gold)`` results kept.
        number_fallback: read the last stand-alone number of a completion that has no
            ``\\boxed{}`` or ``####`` marker (for models prompted without a format).
        rel_tol: relative tolerance for numeric answers; 0 (default) is exact, e.g. 1e-4
            accepts answers rounded to about four significant digits.
        batch_timeout_seconds: wall-time budget of the math-verify part of one call; the
            samples not verified by then score 0 and are counted in
            ``reward/budget_exhausted``. None (default): no budget, only the per-sample limit
            (a batch of pathological answers then costs up to ``timeout_seconds`` each
            divided by ``num_workers``).
    """

    def __init__(
        self,
        timeout_seconds: float = 2.0,
        format_weight: float = 0.0,
        num_workers: int = 2,
        max_completion_chars: int = MAX_COMPLETION_CHARS,
        max_answer_chars: int = 1000,
        cache_size: int = 65536,
        number_fallback: bool = False,
        rel_tol: float = 0.0,
        batch_timeout_seconds: float | None = None,
    ) -> None:
        if timeout_seconds <= 0:
            raise ValueError(f"timeout_seconds must be > 0, got {timeout_seconds}")
        if num_workers < 1:  # a pool of worker processes, started at the first call
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if max_completion_chars < 1 or max_answer_chars < 1:
            raise ValueError("max_completion_chars and max_answer_chars must be >= 1")
        if not 0 <= rel_tol < 1:
            raise ValueError(f"rel_tol must be in [0, 1), got {rel_tol}")
        if batch_timeout_seconds is not None and batch_timeout_seconds <= 0:
            raise ValueError(f"batch_timeout_seconds must be > 0 or None, got {batch_timeout_seconds}")
        self.timeout_seconds = timeout_seconds
        self.format_weight = format_weight
        self.num_workers = num_workers
        self.max_completion_chars = max_completion_chars
        self.max_answer_chars = max_answer_chars
        self.cache_size = cache_size
        self.number_fallback = number_fallback
        self.rel_tol = rel_tol
        self.batch_timeout_seconds = batch_timeout_seconds
        self._pool: VerifierPool | None = None
        self._cache: OrderedDict[_Key, VerifyResult] = OrderedDict()

    def __call__(self, completions: list[str], answers: list[str]) -> RewardOutput:
        if len(completions) != len(answers):
            raise ValueError(f"{len(completions)} completions but {len(answers)} answers")
        n = len(completions)
        scores = _Scores([0.0] * n, [None] * n, ["ok"] * n, [False] * n)
        pending: dict[_Key, list[tuple[int, _Use]]] = {}
        for i, (completion, raw_gold) in enumerate(zip(completions, answers, strict=True)):
            pred = self._final_answer(completion, scores)
            gold = str(raw_gold).strip()
            if not gold or len(gold) > self.max_answer_chars:
                scores.gold[i] = "unparsable"
                continue
            request = scores.decide_here(i, pred, _Gold.read(gold), self.rel_tol)
            if request is None:
                continue
            key, use = request
            hit = self._cache_get(key)
            if hit is None:
                pending.setdefault(key, []).append((i, use))
            else:
                scores.apply(i, hit, use)
        self._verify(pending, scores)

        fmt = [float(len(c) <= self.max_completion_chars and has_final_marker(c)) for c in completions]
        rewards = torch.tensor(
            [c + self.format_weight * f for c, f in zip(scores.correct, fmt, strict=True)],
            dtype=torch.float32,
        )
        denom = max(n, 1)
        metrics = {
            "reward/mean": rewards.sum().item() / denom,
            "reward/accuracy": sum(scores.correct) / denom,
            "reward/format": sum(fmt) / denom,
            **scores.counts(),
            "reward/verifier_calls": float(len(pending)),
        }
        return RewardOutput(rewards, metrics, correct=torch.tensor(scores.correct) > 0.5)

    def _final_answer(self, completion: str, scores: _Scores) -> str | None:
        """The completion's final answer, None (and counted) when there is none to verify."""
        pred, source = extract_answer(completion, self.number_fallback, self.max_completion_chars)
        scores.too_long += source == "too_long"
        if pred is not None and len(pred) > self.max_answer_chars:
            pred = None
        scores.extraction_failures += pred is None
        return pred

    def _verify(self, pending: dict[_Key, list[tuple[int, _Use]]], scores: _Scores) -> None:
        """Send each distinct request to the workers once (within the call's budget) and apply
        its result to every sample waiting on it; cache what came back "ok", and the gold's
        class under ``(None, gold)``."""
        if not pending:
            return
        keys = list(pending)
        results = self._verifier().run(keys, self.batch_timeout_seconds)
        for key, result in zip(keys, results, strict=True):
            if result.status == "ok":
                self._cache_put(key, result)
                self._cache_put((None, key[1]), VerifyResult(result.gold, False, "ok", result.reason))
            for i, use in pending[key]:
                scores.apply(i, result, use)

    def classify_golds(self, golds: list[str]) -> list[tuple[GoldStatus, str]]:
        """``(class, reason)`` of each gold, exactly as ``__call__`` sees it: "ok", "lossy"
        (pays only its own text) or "unparsable" (never pays). Distinct golds are parsed
        once, plain numbers in this process, the rest in the workers, without a budget."""
        out: dict[str, tuple[GoldStatus, str]] = {}
        pending: list[str] = []
        for raw in dict.fromkeys(str(g).strip() for g in golds):
            if not raw:
                out[raw] = ("unparsable", "empty")
            elif len(raw) > self.max_answer_chars:
                out[raw] = ("unparsable", f"longer than max_answer_chars={self.max_answer_chars}")
            elif (read := _Gold.read(raw)).lossy_reason:
                out[raw] = ("lossy", read.lossy_reason)
            elif read.value is not None:
                out[raw] = ("ok", "")
            elif (known := self._cache_get((None, read.worker_text))) is not None:
                out[raw] = (known.gold, known.reason)
            else:
                pending.append(raw)
        texts = [_Gold.read(g).worker_text for g in pending]
        results = self._verifier().run([(None, t) for t in texts]) if pending else []
        for gold, text, result in zip(pending, texts, results, strict=True):
            if result.status == "ok":
                self._cache_put((None, text), result)
                out[gold] = (result.gold, result.reason)
            else:
                out[gold] = ("unparsable", f"verification {result.status}")
        return [out[str(g).strip()] for g in golds]

    def _verifier(self) -> VerifierPool:
        if self._pool is None:
            self._pool = VerifierPool(self.num_workers, self.timeout_seconds, rel_tol=self.rel_tol)
        return self._pool

    def _cache_get(self, key: _Key) -> VerifyResult | None:
        result = self._cache.get(key)
        if result is not None:
            self._cache.move_to_end(key)
        return result

    def _cache_put(self, key: _Key, result: VerifyResult) -> None:
        self._cache[key] = result
        self._cache.move_to_end(key)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    def close(self) -> None:
        """Stop the verifier workers; the next call starts new ones."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_pool"] = None
        state["_cache"] = OrderedDict()
        return state
