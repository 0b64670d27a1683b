"""CE-GPPO: PPO that keeps a bounded gradient on clipped tokens."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .batch import TokenBatch
from .ppo import ClippedPolicyLoss, clip_metrics


class CEGPPOLoss(ClippedPolicyLoss):
    """Clipped tokens keep the PPO value scale but pass a scaled gradient.

    Per-token objective, region by region (``r = exp(logp - old_logp)``, ``eps_l``/``eps_h`` the
    clip range, ``c`` the dual clip; the loss is minus its aggregate):

    - ``A < 0`` and ``r < 1-eps_l``: ``beta_l (1-eps_l) * r/sg(r) * A``; value
      ``beta_l (1-eps_l) A``, gradient wrt ``logp`` equal to ``beta_l (1-eps_l) A``
      (PPO: value ``(1-eps_l) A``, gradient 0).
    - ``A > 0`` and ``r > 1+eps_h``: ``beta_h (1+eps_h) * r/sg(r) * A``; value and gradient wrt
      ``logp`` both ``beta_h (1+eps_h) A`` (PPO: gradient 0).
    - ``A < 0`` and ``r > c``: ``c A``, no gradient (standard dual clip, ``max(PPO_t, c A)``).
    - elsewhere ``r A``, identical to PPO.

    ``r/sg(r)`` is computed as ``exp(log r - sg(log r))`` (exactly 1 in value).

    Args:
        beta_low, beta_high: ``beta_l``, ``beta_h`` >= 0, the gradient scale kept on clipped tokens.
        dual_clip: ``c``, on by default here (10.0); None disables it.
        **kwargs: ``clip_low``, ``clip_high``, ``loss_agg_mode``, ``norm_constant``, ``beta``,
            ``kl_estimator``, as :class:`~egspo.losses.ppo.ClippedPolicyLoss`.

    Metrics: as :class:`PPOClipLoss`; ``clip_frac_low``/``clip_frac_high`` count the tokens in
    the first two regions (where PPO's gradient would be 0).
    """

    def __init__(
        self,
        beta_low: float = 0.75,
        beta_high: float = 1.0,
        dual_clip: float | None = 10.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(dual_clip=dual_clip, **kwargs)
        if not beta_low >= 0:
            raise ValueError(f"beta_low must be >= 0, got {beta_low}")
        if not beta_high >= 0:
            raise ValueError(f"beta_high must be >= 0, got {beta_high}")
        self.beta_low = beta_low
        self.beta_high = beta_high

    def policy_term(self, batch: TokenBatch, log_ratio: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        advantages = batch.advantages
        clip = self.clip(log_ratio, advantages)
        unit = torch.exp(log_ratio - log_ratio.detach())  # r / sg(r): value 1, d/dlogp = 1
        objective = torch.where(
            clip.clipped_low,
            self.beta_low * (1.0 - self.clip_low) * unit * advantages,
            torch.where(
                clip.clipped_high, self.beta_high * (1.0 + self.clip_high) * unit * advantages, clip.objective
            ),
        )
        return self.aggregate(-objective, batch.mask), clip_metrics(clip, batch.mask)
