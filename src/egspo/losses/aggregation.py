"""One place that turns per-token losses ``[B, T]`` into a scalar."""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import Tensor

AggMode = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
AGG_MODES: tuple[str, ...] = get_args(AggMode)


NORM_MODE = "seq-mean-token-sum-norm"


def check_agg_mode(mode: str, norm_constant: float | None = None) -> None:
    """Raise a ValueError naming the option if ``mode``/``norm_constant`` are invalid.

    ``norm_constant`` may be None here (a policy loss's ``setup`` fills it); :func:`aggregate` needs it.
    """
    if mode not in AGG_MODES:
        raise ValueError(f"loss_agg_mode must be one of {AGG_MODES}, got {mode!r}")
    if norm_constant is not None and not norm_constant > 0:
        raise ValueError(f"norm_constant must be > 0, got {norm_constant}")


def missing_norm_constant(mode: str, norm_constant: float | None) -> bool:
    """True when ``mode`` is Dr.GRPO's ``token-sum / constant`` and the constant is not set."""
    return mode == NORM_MODE and norm_constant is None


def aggregate(
    values: Tensor, mask: Tensor, mode: AggMode = "token-mean", *, norm_constant: float | None = None
) -> Tensor:
    """Reduce per-token ``values`` over the valid tokens (``mask > 0``) of a mini-batch.

    With ``v`` the values, ``m`` the mask, ``n_i = sum_t m_it`` and ``S`` the set of sequences
    with ``n_i > 0``:

    - ``token-mean``: ``sum_it m v / sum_it m`` (every token weighs the same; DAPO default).
    - ``seq-mean-token-mean``: ``mean_{i in S} (sum_t m v / n_i)`` (every sequence weighs the same).
    - ``seq-mean-token-sum``: ``mean_{i in S} sum_t m v``.
    - ``seq-mean-token-sum-norm``: ``mean_{i in S} (sum_t m v / C)``, Dr.GRPO's length-unbiased
      form; ``C = norm_constant`` (e.g. ``max_completion_length``), required. A constant ``C`` keeps
      the per-token weight independent of the response lengths in the batch; the batch width
      ``T`` would not be one (it changes with every batch and micro-batch).

    Masked positions are replaced by 0 with ``torch.where`` (not multiplied: ``0 * inf`` is NaN),
    so they never reach the result or its gradient. An all-zero mask gives 0, not NaN.

    Every mode is a sum over tokens divided by :func:`aggregation_units`, so a batch split into row
    subsets gives back the single-pass value as ``sum_k units_k / units * aggregate(subset_k)``.
    """
    check_agg_mode(mode, norm_constant)
    if missing_norm_constant(mode, norm_constant):
        raise ValueError(
            f"loss_agg_mode={NORM_MODE!r} needs norm_constant (Dr.GRPO's constant, e.g. "
            "max_completion_length); the batch width would change the loss scale with every batch"
        )
    valid = mask > 0
    values = torch.where(valid, values, torch.zeros((), dtype=values.dtype, device=values.device))
    if mode == "token-mean":
        return values.sum() / valid.sum().clamp(min=1)
    tokens_per_seq = valid.sum(dim=-1)
    seq_sum = values.sum(dim=-1)
    if mode == "seq-mean-token-mean":
        per_seq = seq_sum / tokens_per_seq.clamp(min=1)
    elif mode == "seq-mean-token-sum":
        per_seq = seq_sum
    else:
        per_seq = seq_sum / norm_constant
    return per_seq.sum() / (tokens_per_seq > 0).sum().clamp(min=1)


def aggregation_units(mask: Tensor, mode: AggMode) -> Tensor:
    """The denominator of :func:`aggregate`: valid tokens (``token-mean``), else sequences with >= 1.

    A micro-batch's loss times ``aggregation_units(micro) / aggregation_units(mini-batch)``, summed
    over the micro-batches, is the mini-batch's loss, and so is its gradient.
    """
    check_agg_mode(mode)
    valid = mask > 0
    if mode == "token-mean":
        return valid.sum()
    return valid.any(dim=-1).sum()


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Detached mean over valid tokens, for metrics."""
    return aggregate(values.detach().float(), mask, "token-mean")
