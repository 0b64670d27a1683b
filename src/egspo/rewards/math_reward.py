"""Correctness reward for math answers, checked with math-verify under a hard time bound."""

from __future__ import annotations

from collections import OrderedDict

import torch

from egspo.rewards.base import RewardFunction, RewardOutput
from egspo.rewards.extraction import canonical_number, canonical_text, extract_answer, has_final_marker
from egspo.rewards.verifier import VerifierPool, VerifyResult


def _as_latex(answer: str) -> str:
    """Give math-verify an unambiguous target: its highest-priority form is ``\\boxed{}``."""
    return answer if "\\boxed" in answer else "\\boxed{" + answer + "}"


class MathReward(RewardFunction):
    """``reward = correct + format_weight * format`` per completion.

    ``correct`` is 1 when the completion's final answer (last ``\\boxed{}``, else the
    ``#### N`` line, else the last number) equals the gold answer, else 0. Only the last
    ``max_completion_chars`` characters are read (the answer is at the end), and an
    extracted answer longer than ``max_answer_chars`` counts as an extraction failure.

    Fast path, in this process: plain numbers (integers, decimals, fractions) are compared
    exactly, and a prediction textually equal to an already-verified gold is accepted.
    Everything else goes to math-verify in worker processes (``VerifierPool``), each
    sample bounded by ``timeout_seconds`` of wall time; results are cached by
    ``(prediction, gold)``. A gold that math-verify cannot parse into an expression never
    yields 1. A verifier error or timeout gives 0 and is counted in the metrics.

    ``format`` is 1 when the last line holds ``#### X`` or ``\\boxed{X}`` (see FormatReward).
    """

    def __init__(
        self,
        timeout_seconds: float = 2.0,
        format_weight: float = 0.0,
        num_workers: int = 2,
        max_completion_chars: int = 8192,
        max_answer_chars: int = 1000,
        cache_size: int = 65536,
    ) -> None:
        if timeout_seconds <= 0:
            raise ValueError(f"timeout_seconds must be > 0, got {timeout_seconds}")
        if max_completion_chars < 1 or max_answer_chars < 1:
            raise ValueError("max_completion_chars and max_answer_chars must be >= 1")
        self.timeout_seconds = timeout_seconds
        self.format_weight = format_weight
        self.num_workers = num_workers
        self.max_completion_chars = max_completion_chars
        self.max_answer_chars = max_answer_chars
        self.cache_size = cache_size
        self._pool: VerifierPool | None = None
        self._cache: OrderedDict[tuple[str | None, str], VerifyResult] = OrderedDict()

    def __call__(self, completions: list[str], answers: list[str]) -> RewardOutput:
        if len(completions) != len(answers):
            raise ValueError(f"{len(completions)} completions but {len(answers)} answers")
        n = len(completions)
        correct = [0.0] * n
        gold_ok: list[bool | None] = [None] * n
        status = ["ok"] * n
        extraction_failures = 0
        pending: dict[tuple[str | None, str], list[int]] = {}

        for i, (completion, raw_gold) in enumerate(zip(completions, answers, strict=True)):
            gold = str(raw_gold).strip()
            tail = completion[-self.max_completion_chars :]
            pred, _ = extract_answer(tail)
            if pred is not None and len(pred) > self.max_answer_chars:
                pred = None
            if pred is None:
                extraction_failures += 1
            if not gold or len(gold) > self.max_answer_chars:
                gold_ok[i] = False
                continue
            gold_number = canonical_number(gold)
            if gold_number is not None:
                gold_ok[i] = True
                if pred is None:
                    continue
                pred_number = canonical_number(pred)
                if pred_number is not None:
                    if pred_number[0] == gold_number[0]:
                        correct[i] = 1.0
                        continue
                    if pred_number[1] and gold_number[1]:  # two different integers
                        continue
            gold_latex = _as_latex(gold)
            known = self._cache_get((None, gold_latex))  # gold parse status from earlier calls
            if known is not None and (not known.gold_ok or pred is None):
                gold_ok[i] = known.gold_ok
                continue
            if pred is None:
                pending.setdefault((None, gold_latex), []).append(i)
                continue
            if known is not None and canonical_text(pred) == canonical_text(gold):
                gold_ok[i], correct[i] = True, 1.0
                continue
            key = (_as_latex(pred), gold_latex)
            hit = self._cache_get(key)
            if hit is not None:
                self._apply(i, hit, correct, gold_ok, status)
                continue
            pending.setdefault(key, []).append(i)

        if pending:
            keys = list(pending)
            for key, result in zip(keys, self._verifier().run(keys), strict=True):
                self._cache_put(key, result)
                if result.status == "ok":
                    self._cache_put((None, key[1]), VerifyResult(result.gold_ok, False, "ok"))
                for i in pending[key]:
                    self._apply(i, result, correct, gold_ok, status)

        fmt = [float(has_final_marker(c[-self.max_completion_chars :])) for c in completions]
        rewards = torch.tensor(
            [c + self.format_weight * f for c, f in zip(correct, fmt, strict=True)], dtype=torch.float32
        )
        denom = max(n, 1)
        metrics = {
            "reward/mean": rewards.sum().item() / denom,
            "reward/accuracy": sum(correct) / denom,
            "reward/format": sum(fmt) / denom,
            "reward/unparsable_gold": float(sum(ok is False for ok in gold_ok)),
            "reward/extraction_failures": float(extraction_failures),
            "reward/verify_errors": float(status.count("error")),
            "reward/verify_timeouts": float(status.count("timeout")),
            "reward/verifier_calls": float(len(pending)),
        }
        return RewardOutput(rewards, metrics, correct=torch.tensor(correct) > 0.5)

    @staticmethod
    def _apply(i: int, result: VerifyResult, correct: list, gold_ok: list, status: list) -> None:
        status[i] = result.status
        gold_ok[i] = result.gold_ok if result.status == "ok" else gold_ok[i]
        correct[i] = 1.0 if (result.correct and result.gold_ok and result.status == "ok") else 0.0

    def _verifier(self) -> VerifierPool:
        if self._pool is None:
            self._pool = VerifierPool(self.num_workers, self.timeout_seconds)
        return self._pool

    def _cache_get(self, key: tuple[str | None, str]) -> VerifyResult | None:
        result = self._cache.get(key)
        if result is not None:
            self._cache.move_to_end(key)
        return result

    def _cache_put(self, key: tuple[str | None, str], result: VerifyResult) -> None:
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
