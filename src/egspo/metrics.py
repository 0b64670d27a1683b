"""Evaluation metrics over several sampled answers per prompt: pass@k, maj@k, length, truncation.

Every metric keeps per-prompt sums (and counts) as `torchmetrics` states reduced with
``dist_reduce_fx="sum"``, so `compute()` gives the same value whether the prompts were seen by
one process or sharded over many. The module feeds them one eval batch at a time:

- ``correct``: ``[P, n]`` bool, sample ``j`` of prompt ``i`` has the right final answer;
- ``completions``: the ``P x n`` decoded answers (for majority voting);
- ``lengths`` / ``truncated``: ``[P, n]`` response tokens and whether no EOS came.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric, MetricCollection

from egspo.rewards.extraction import extract_answer
from egspo.rewards.numeric import canonical_number, canonical_text


def pass_at_k(correct_counts: Tensor, n: int, k: int) -> Tensor:
    """Unbiased pass@k per prompt (Chen et al., 2021) from ``c`` correct out of ``n`` samples.

    ``pass@k = 1 - C(n - c, k) / C(n, k) = 1 - prod_{i = n - c + 1}^{n} (1 - k / i)``,
    the probability that at least one of ``k`` samples drawn without replacement from the
    ``n`` is correct. The product form avoids huge binomials; it is 1 whenever ``n - c < k``
    (one factor is exactly zero). ``pass@1 = c / n``.
    """
    if not 1 <= k <= n:
        raise ValueError(f"pass@k needs 1 <= k <= n, got k={k}, n={n}")
    c = correct_counts.to(torch.float64).reshape(-1, 1)
    j = torch.arange(n, device=c.device, dtype=torch.float64)  # factor j covers i = n - j
    factors = torch.where(j < c, 1.0 - k / (n - j), torch.ones_like(j))
    return 1.0 - factors.prod(dim=1)


def answer_key(completion: str, number_fallback: bool = False) -> str | None:
    """The final answer of a completion in a form where equal keys mean equal answers.

    The answer is read as ``MathReward`` reads it (last ``\\boxed{}`` or ``####`` marker; the
    last stand-alone number only with ``number_fallback``, as the reward's option), so that
    maj@k votes over the answers the reward scores. Numbers compare exactly (``1,000`` =
    ``1000.0``, ``1/2`` = ``\\frac{1}{2}``); anything else by its canonical text. None when
    there is no answer.
    """
    answer, _ = extract_answer(completion, number_fallback)  # whole text, as the reward reads it
    if answer is None:
        return None
    number = canonical_number(answer)
    if number is not None:
        return number[0]
    return canonical_text(answer) or None


def majority_vote_accuracy(keys: Sequence[str | None], correct: Sequence[bool]) -> float:
    """Correctness of the majority answer among ``keys`` (None = no answer, never voted for).

    An answer counts as correct when any sample giving it was judged correct. A tie between
    the most frequent answers is broken uniformly at random, so the score is the expected
    correctness: the fraction of tied answers that are correct. No answer at all scores 0.
    """
    if len(keys) != len(correct):
        raise ValueError(f"{len(keys)} answers but {len(correct)} correctness flags")
    votes = Counter(k for k in keys if k is not None)
    if not votes:
        return 0.0
    right = {k for k, ok in zip(keys, correct, strict=True) if k is not None and ok}
    top = max(votes.values())
    tied = [k for k, v in votes.items() if v == top]
    return sum(k in right for k in tied) / len(tied)


def _check_rows(correct: Tensor, num_samples: int | None = None) -> None:
    if correct.dim() != 2:
        raise ValueError(f"expected a [prompts, samples] tensor, got shape {tuple(correct.shape)}")
    if num_samples is not None and correct.shape[1] != num_samples:
        raise ValueError(f"expected {num_samples} samples per prompt, got {correct.shape[1]}")


class _MeanAtK(Metric):
    """Per-prompt scores for each k in ``ks``, summed over prompts (and processes), then averaged.

    Subclasses set ``name`` and add ``update``; ``compute()`` returns ``{"<name>@k": mean}``.
    """

    name: str
    full_state_update = False
    higher_is_better = True

    def __init__(self, ks: Sequence[int] = (1,), **kwargs) -> None:
        super().__init__(**kwargs)
        if not ks or min(ks) < 1:
            raise ValueError(f"ks must be positive integers, got {list(ks)}")
        self.ks = sorted(set(int(k) for k in ks))
        self.add_state("total", torch.zeros(len(self.ks), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("prompts", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def compute(self) -> dict[str, Tensor]:
        means = self.total / self.prompts.clamp(min=1)
        return {f"{self.name}@{k}": means[i].float() for i, k in enumerate(self.ks)}


class PassAtK(_MeanAtK):
    """Mean over prompts of the unbiased pass@k, for each k in ``ks`` (see :func:`pass_at_k`).

    ``compute()`` returns ``{"pass@k": value}``. pass@1 is the mean correctness of all samples.
    """

    name = "pass"

    def update(self, correct: Tensor) -> None:
        _check_rows(correct)
        n = correct.shape[1]
        if max(self.ks) > n:
            raise ValueError(f"pass@{max(self.ks)} needs at least {max(self.ks)} samples per prompt, got {n}")
        counts = correct.to(torch.float64).sum(dim=1)
        self.total += torch.stack([pass_at_k(counts, n, k).sum() for k in self.ks]).to(self.total)
        self.prompts += correct.shape[0]


class MajorityAtK(_MeanAtK):
    """Mean over prompts of maj@k: majority vote over the final answers of the first k samples.

    ``compute()`` returns ``{"maj@k": value}``; see :func:`majority_vote_accuracy` for ties.
    ``number_fallback`` must match the reward's option of that name (see :func:`answer_key`).
    """

    name = "maj"

    def __init__(self, ks: Sequence[int] = (1,), number_fallback: bool = False, **kwargs) -> None:
        super().__init__(ks, **kwargs)
        self.number_fallback = number_fallback

    def update(self, completions: Sequence[Sequence[str]], correct: Tensor) -> None:
        _check_rows(correct)
        if len(completions) != correct.shape[0]:
            raise ValueError(f"{len(completions)} prompts of completions but {correct.shape[0]} rows")
        n = correct.shape[1]
        if max(self.ks) > n:
            raise ValueError(f"maj@{max(self.ks)} needs at least {max(self.ks)} samples per prompt, got {n}")
        flags = correct.bool().tolist()
        sums = [0.0] * len(self.ks)
        for texts, row in zip(completions, flags, strict=True):
            keys = [answer_key(t, self.number_fallback) for t in texts]
            for i, k in enumerate(self.ks):
                sums[i] += majority_vote_accuracy(keys[:k], row[:k])
        self.total += torch.tensor(sums, dtype=torch.float64, device=self.total.device)
        self.prompts += len(completions)


class _SampleMean(Metric):
    """Mean of a per-sample quantity over all samples of all prompts."""

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("total", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("samples", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def _add(self, values: Tensor) -> None:
        self.total += values.detach().to(torch.float64).sum()
        self.samples += values.numel()

    def compute(self) -> Tensor:
        return (self.total / self.samples.clamp(min=1)).float()


class ResponseLength(_SampleMean):
    """Mean response length in tokens (EOS included), over every sample."""

    higher_is_better = None

    def update(self, lengths: Tensor) -> None:
        self._add(lengths)


class TruncationRate(_SampleMean):
    """Fraction of samples that hit the length limit without an EOS."""

    higher_is_better = False

    def update(self, truncated: Tensor) -> None:
        self._add(truncated.float())


class GreedyAccuracy(_SampleMean):
    """Fraction of prompts whose greedy answer is correct (the headline accuracy)."""

    higher_is_better = True

    def update(self, greedy_correct: Tensor) -> None:
        self._add(greedy_correct.float())


class EvalMetrics(MetricCollection):
    """Everything reported per eval set: ``accuracy`` (greedy), ``pass@k``, ``maj@k`` (k > 1),
    ``response_length`` and ``truncation_rate`` of the ``num_samples`` answers per prompt.

    ``update(greedy_correct=[P], correct=[P, n], completions=P x n texts, lengths=[P, n],
    truncated=[P, n])``; each metric takes the arguments it needs. With ``num_samples = 1``
    the samples are the greedy answers and only pass@1 is reported. ``number_fallback``:
    the reward's option of that name, so that maj@k reads answers as the reward does.
    """

    def __init__(
        self, num_samples: int = 1, pass_k: Sequence[int] | None = None, number_fallback: bool = False
    ) -> None:
        ks = resolve_pass_k(num_samples, pass_k)
        metrics: dict[str, Metric] = {
            "accuracy": GreedyAccuracy(),
            "pass": PassAtK(ks),
            "response_length": ResponseLength(),
            "truncation_rate": TruncationRate(),
        }
        vote = [k for k in ks if k > 1]
        if vote:
            metrics["maj"] = MajorityAtK(vote, number_fallback)
        super().__init__(metrics, compute_groups=False)
        self.num_samples = num_samples


def resolve_pass_k(num_samples: int, pass_k: Sequence[int] | None) -> list[int]:
    """The k values reported: ``pass_k`` checked against ``num_samples``, default ``[1, n]``."""
    if num_samples < 1:
        raise ValueError(f"eval_num_samples must be >= 1, got {num_samples}")
    ks = sorted(set(pass_k)) if pass_k else sorted({1, num_samples})
    bad = [k for k in ks if not 1 <= k <= num_samples]
    if bad:
        raise ValueError(f"eval_pass_k: every k must be in [1, eval_num_samples={num_samples}], got {bad}")
    return ks
