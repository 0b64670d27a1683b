"""PPO clipped surrogate (GRPO / DAPO) and the clip helper shared by the clipped losses."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .aggregation import AggMode, masked_mean
from .base import PolicyLoss
from .batch import TokenBatch
from .kl import KLEstimator


class ClippedObjective(NamedTuple):
    """Per-token PPO objective and the regions where a clip is active (bool, ``[B, T]``)."""

    objective: Tensor
    ratio: Tensor
    clipped_low: Tensor
    clipped_high: Tensor
    dual_clipped: Tensor


def check_clip_args(clip_low: float, clip_high: float, dual_clip: float | None) -> None:
    """Raise a ValueError naming the option if a clip argument is out of range."""
    if not 0 <= clip_low < 1:
        raise ValueError(f"clip_low must be in [0, 1), got {clip_low}")
    if not clip_high >= 0:
        raise ValueError(f"clip_high must be >= 0, got {clip_high}")
    if dual_clip is not None and not dual_clip > 1:
        raise ValueError(f"dual_clip must be > 1 (or None to disable), got {dual_clip}")


def clipped_objective(
    log_ratio: Tensor,
    advantages: Tensor,
    clip_low: float | Tensor,
    clip_high: float | Tensor,
    dual_clip: float | None = None,
) -> ClippedObjective:
    """``PPO_t = min(r A, clip(r, 1-eps_l, 1+eps_h) A)``, optionally dual-clipped.

    Written region by region so the metrics name exactly the tokens whose gradient is cut:

    - ``clipped_low``:  ``A < 0`` and ``r < 1-eps_l``: value ``(1-eps_l) A``, no gradient.
    - ``clipped_high``: ``A > 0`` and ``r > 1+eps_h``: value ``(1+eps_h) A``, no gradient.
    - ``dual_clipped``: ``A < 0`` and ``r > c``: value ``c A``, no gradient
      (``max(PPO_t, c A)``; there ``PPO_t = r A`` and ``c A > r A`` iff ``r > c``).
    - elsewhere ``r A``.

    ``clip_low``/``clip_high`` may be tensors broadcastable to ``[B, T]`` (per-token ranges).
    """
    ratio = torch.exp(log_ratio)
    lower = 1.0 - clip_low
    upper = 1.0 + clip_high
    negative = advantages < 0
    clipped_low = negative & (ratio < lower)
    clipped_high = (advantages > 0) & (ratio > upper)
    objective = torch.where(
        clipped_low, lower * advantages, torch.where(clipped_high, upper * advantages, ratio * advantages)
    )
    if dual_clip is None:
        dual_clipped = torch.zeros_like(clipped_low)
    else:
        dual_clipped = negative & (ratio > dual_clip)
        objective = torch.where(dual_clipped, dual_clip * advantages, objective)
    return ClippedObjective(objective, ratio, clipped_low, clipped_high, dual_clipped)


def clip_metrics(clip: ClippedObjective, mask: Tensor) -> dict[str, Tensor]:
    """Fractions of valid tokens per clip region, and the mean ratio."""
    return {
        "clip_frac_low": masked_mean(clip.clipped_low.float(), mask),
        "clip_frac_high": masked_mean(clip.clipped_high.float(), mask),
        "clip_frac_dual": masked_mean(clip.dual_clipped.float(), mask),
        "ratio_mean": masked_mean(clip.ratio, mask),
    }


class ClippedPolicyLoss(PolicyLoss):
    """Shared base of the losses built on PPO's clipped surrogate: the options they all take.

    Subclasses declare their own options and pass the others on with ``**kwargs``; jsonargparse
    resolves those to the arguments below, so YAML ``init_args`` name them directly.

    Args:
        clip_low: eps_l, the ratio is clipped at ``1 - clip_low`` (TRL ``epsilon``).
        clip_high: eps_h, the ratio is clipped at ``1 + clip_high`` (TRL ``epsilon_high``).
        dual_clip: c > 1; for ``A < 0`` the objective is ``max(PPO_t, c A)``, bounding how far a
            very off-policy bad token can push. None disables it.
        loss_agg_mode, norm_constant: see :func:`egspo.losses.aggregate`; a ``norm_constant`` left
            None for ``seq-mean-token-sum-norm`` is filled by :meth:`setup`.
        beta, kl_estimator: weight and estimator of the KL-to-reference term (off at 0).
    """

    def __init__(
        self,
        *,
        clip_low: float = 0.2,
        clip_high: float = 0.2,
        dual_clip: float | None = None,
        loss_agg_mode: AggMode = "token-mean",
        norm_constant: float | None = None,
        beta: float = 0.0,
        kl_estimator: KLEstimator = "k3",
    ) -> None:
        super().__init__(
            loss_agg_mode=loss_agg_mode, norm_constant=norm_constant, beta=beta, kl_estimator=kl_estimator
        )
        check_clip_args(clip_low, clip_high, dual_clip)
        self.clip_low = clip_low
        self.clip_high = clip_high
        self.dual_clip = dual_clip

    def clip(self, log_ratio: Tensor, advantages: Tensor) -> ClippedObjective:
        """:func:`clipped_objective` with this loss's clip range."""
        return clipped_objective(log_ratio, advantages, self.clip_low, self.clip_high, self.dual_clip)


class PPOClipLoss(ClippedPolicyLoss):
    """GRPO/DAPO policy loss: ``-aggregate(PPO_t)``; DAPO's clip-higher is ``clip_high=0.28``.

    Options: those of :class:`ClippedPolicyLoss` (defaults eps_l = eps_h = 0.2, no dual clip,
    ``token-mean``, no KL).

    Metrics: ``clip_frac_low``, ``clip_frac_high``, ``clip_frac_dual``, ``ratio_mean``,
    ``pg_loss``, ``approx_kl`` (+ ``kl`` when ``beta > 0``).
    """

    def policy_term(self, batch: TokenBatch, log_ratio: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        clip = self.clip(log_ratio, batch.advantages)
        return self.aggregate(-clip.objective, batch.mask), clip_metrics(clip, batch.mask)
