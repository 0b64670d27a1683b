"""CISPO: clipped importance-sampling-weight policy optimization (MiniMax-M1, arXiv 2506.13585)."""

from __future__ import annotations

import torch
from torch import Tensor

from .aggregation import AggMode, masked_mean
from .base import PolicyLoss
from .batch import TokenBatch
from .kl import KLEstimator


class CISPOLoss(PolicyLoss):
    """REINFORCE with a clipped, stop-gradient importance weight: no token ever loses its gradient.

    Formula card (``r_t = exp(logp_t - old_logp_t)``):

    - ``w_t = sg(clip(r_t, 1 - eps_low, 1 + eps_high))``, the clipped IS weight, no gradient;
    - per token ``w_t * A_t * logp_t``; ``loss = -aggregate(w_t A_t logp_t)``.

    Its gradient wrt ``logp_t`` is ``-w_t A_t / units``: where PPO's min/clip would zero a token's
    gradient (ratio outside the range in the direction of its advantage), CISPO keeps it, scaled by
    the capped weight. The value is not PPO's (``-A logp`` on-policy, not ``-A``); only the gradient
    is the estimator.

    Defaults and names. The paper (section 3.1) clips only from above in practice ("we did not
    impose a lower bound ... set eps_low^IS to a large value") and aggregates over all tokens of the
    batch (``token-mean``). TRL's ``loss_type="cispo"`` caps the weight at ``epsilon_high`` with no
    lower bound (``clamp(r, max=epsilon_high)``, an absolute cap, suggested value 5.0); verl's
    ``cispo`` uses ``clip(r, 1 - clip_ratio_low, 1 + clip_ratio_high)``. egspo names the bounds as
    its other losses do, relative to 1: ``clip_high = 4.0`` (cap ``1 + 4 = 5``, TRL's 5.0) and
    ``clip_low = None`` (no lower bound, the paper's and TRL's); a float ``clip_low`` in [0, 1)
    floors the weight at ``1 - clip_low`` (verl's form).

    Args:
        clip_low: eps_low^IS, None for no lower bound.
        clip_high: eps_high^IS > 0; the weight is capped at ``1 + clip_high``.
        loss_agg_mode, norm_constant, beta, kl_estimator: as :class:`~egspo.losses.PolicyLoss`.

    Metrics: ``clip_frac_low`` / ``clip_frac_high`` (fractions of valid tokens whose weight was
    raised to ``1 - eps_low`` / capped at ``1 + eps_high``; their gradient is kept), ``ratio_mean``
    (of ``r_t``), ``is_weight_mean`` (of ``w_t``), ``pg_loss``, ``approx_kl`` (+ ``kl``).
    """

    def __init__(
        self,
        *,
        clip_low: float | None = None,
        clip_high: float = 4.0,
        loss_agg_mode: AggMode = "token-mean",
        norm_constant: float | None = None,
        beta: float = 0.0,
        kl_estimator: KLEstimator = "k3",
    ) -> None:
        super().__init__(
            loss_agg_mode=loss_agg_mode, norm_constant=norm_constant, beta=beta, kl_estimator=kl_estimator
        )
        if clip_low is not None and not 0 <= clip_low < 1:
            raise ValueError(f"clip_low must be in [0, 1) or None (no lower bound), got {clip_low}")
        if not clip_high > 0:
            raise ValueError(
                f"clip_high must be > 0 (the weight is capped at 1 + clip_high), got {clip_high}"
            )
        self.clip_low = clip_low
        self.clip_high = clip_high

    def policy_term(self, batch: TokenBatch, log_ratio: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        ratio = torch.exp(log_ratio.detach())
        upper = 1.0 + self.clip_high
        lower = 0.0 if self.clip_low is None else 1.0 - self.clip_low
        weight = ratio.clamp(min=lower, max=upper)
        objective = weight * batch.advantages * batch.logprobs
        metrics = {
            "clip_frac_low": masked_mean((ratio < lower).float(), batch.mask),
            "clip_frac_high": masked_mean((ratio > upper).float(), batch.mask),
            "ratio_mean": masked_mean(ratio, batch.mask),
            "is_weight_mean": masked_mean(weight, batch.mask),
        }
        return self.aggregate(-objective, batch.mask), metrics
