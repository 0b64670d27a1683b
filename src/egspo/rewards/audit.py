"""Gold-answer audit at data load: which golds the math reward can never (fully) pay."""

from __future__ import annotations

import time
from dataclasses import dataclass

from egspo.rewards.math_reward import MathReward
from egspo.rewards.verifier import GoldStatus


@dataclass(frozen=True)
class GoldAudit:
    """Classification of a list of golds, aligned with it.

    ``flags[i]`` is "ok", "lossy" (the parse drops meaning: the reward pays only the gold's
    own text) or "unparsable" (the reward never pays), ``reasons[i]`` says why. The counts
    are over the list (prompts), the examples are distinct golds with their reason.
    """

    flags: list[GoldStatus]
    reasons: list[str]
    distinct: int
    seconds: float
    unparsable_examples: list[tuple[str, str]]
    lossy_examples: list[tuple[str, str]]

    @property
    def unparsable(self) -> int:
        return self.flags.count("unparsable")

    @property
    def lossy(self) -> int:
        return self.flags.count("lossy")

    @property
    def ok(self) -> list[bool]:
        """Per gold: True when the reward can verify it in full (the prompts to keep)."""
        return [flag == "ok" for flag in self.flags]

    def metrics(self, prefix: str = "data/") -> dict[str, float]:
        """Counts ready to log (TensorBoard scalars)."""
        return {
            f"{prefix}gold_total": float(len(self.flags)),
            f"{prefix}gold_unparsable": float(self.unparsable),
            f"{prefix}gold_lossy": float(self.lossy),
        }

    def summary(self) -> str:
        """A few lines for the console: counts, then the examples with their reasons."""
        lines = [
            f"gold audit: {len(self.flags)} golds ({self.distinct} distinct) in {self.seconds:.1f} s: "
            f"{self.unparsable} unparsable (never rewarded), {self.lossy} lossy (rewarded only for "
            "their exact text)"
        ]
        for name, examples in (("unparsable", self.unparsable_examples), ("lossy", self.lossy_examples)):
            lines += [f"  {name}: {gold!r}: {reason}" for gold, reason in examples]
        return "\n".join(lines)


def audit_golds(golds: list[str], reward: MathReward | None = None, max_examples: int = 5) -> GoldAudit:
    """Classify every gold the way ``reward`` (default: a ``MathReward()``) scores it.

    Each distinct gold is parsed once; plain numbers (all of GSM8K) cost microseconds, the
    rest a math-verify parse in the reward's worker processes (and land in its cache).
    """
    own = reward is None
    scorer = MathReward() if reward is None else reward
    start = time.perf_counter()
    try:
        classes = scorer.classify_golds(golds)
    finally:
        if own:
            scorer.close()
    seconds = time.perf_counter() - start
    examples: dict[str, dict[str, str]] = {"unparsable": {}, "lossy": {}}
    for gold, (flag, reason) in zip(golds, classes, strict=True):
        if flag != "ok" and len(examples[flag]) < max_examples:
            examples[flag].setdefault(str(gold), reason)
    return GoldAudit(
        flags=[flag for flag, _ in classes],
        reasons=[reason for _, reason in classes],
        distinct=len({str(g).strip() for g in golds}),
        seconds=seconds,
        unparsable_examples=list(examples["unparsable"].items()),
        lossy_examples=list(examples["lossy"].items()),
    )
