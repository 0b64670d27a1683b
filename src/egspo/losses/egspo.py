"""EGSPO: entropy-gated selective policy optimization (arXiv 2602.03309)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from .aggregation import AggMode, masked_mean
from .base import PolicyLoss
from .batch import TokenBatch
from .gate import EntropyGate
from .kl import KLEstimator
from .ppo import check_clip_args, clip_metrics, clipped_objective

PHI_CHORD = "p(1-p)"


class EGSPOLoss(PolicyLoss):
    """Entropy-gated PPO: ``loss = -aggregate(w_t * PPO_t)``.

    ``w_t = 1`` for tokens at or above the gate threshold (uncertain "forking" tokens get the
    full update) and ``phi`` below it (confident tokens get an attenuated one). Both branches
    keep ``A_t``, so a wrong answer's tokens are always pushed down. Gated-out tokens still count
    in the aggregation denominator.

    Args:
        clip_low, clip_high, dual_clip: as :class:`PPOClipLoss`.
        gate: threshold rule and hard/soft form; None means ``EntropyGate()`` (quantile 0.8).
        low_entropy_weight: ``phi`` in ``[0, 1]``, or ``"p(1-p)"`` for the CHORD-phi form
            ``sg(p_t (1 - p_t))`` with ``p_t = exp(logprobs_t)`` under the current policy.
        loss_agg_mode, norm_constant, beta, kl_estimator: as :class:`PPOClipLoss`.

    The threshold is ``batch.entropy_threshold`` when given, else ``gate.threshold`` on this
    batch. Metrics: ``gate_threshold``, ``gate_frac_high`` / ``gate_frac_low`` (fractions of
    valid tokens with ``H >= tau`` / ``H < tau``), ``gate_weight_mean``, plus PPO's metrics.
    """

    def __init__(
        self,
        clip_low: float = 0.2,
        clip_high: float = 0.2,
        dual_clip: float | None = None,
        gate: EntropyGate | None = None,
        low_entropy_weight: float | Literal["p(1-p)"] = 0.1,
        loss_agg_mode: AggMode = "token-mean",
        norm_constant: float | None = None,
        beta: float = 0.0,
        kl_estimator: KLEstimator = "k3",
    ) -> None:
        super().__init__(
            loss_agg_mode=loss_agg_mode, norm_constant=norm_constant, beta=beta, kl_estimator=kl_estimator
        )
        check_clip_args(clip_low, clip_high, dual_clip)
        _check_low_entropy_weight(low_entropy_weight)
        self.clip_low = clip_low
        self.clip_high = clip_high
        self.dual_clip = dual_clip
        self.gate = EntropyGate() if gate is None else gate
        self.low_entropy_weight = low_entropy_weight

    def policy_loss(self, batch: TokenBatch, log_ratio: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        _check_low_entropy_weight(self.low_entropy_weight)
        threshold = batch.entropy_threshold
        if threshold is None:
            threshold = self.gate.threshold(batch.entropy, batch.mask)
        threshold = threshold.to(batch.entropy.device)
        if self.low_entropy_weight == PHI_CHORD:
            p = torch.exp(batch.logprobs.detach())
            phi: float | Tensor = p * (1.0 - p)
        else:
            phi = float(self.low_entropy_weight)
        weights = self.gate.weights(batch.entropy, threshold, phi)
        clip = clipped_objective(log_ratio, batch.advantages, self.clip_low, self.clip_high, self.dual_clip)
        loss = self.aggregate(-weights * clip.objective, batch.mask)
        high = (batch.entropy >= threshold).float()
        metrics = clip_metrics(clip, batch.mask)
        metrics.update(
            gate_threshold=threshold.detach().clone(),
            gate_frac_high=masked_mean(high, batch.mask),
            gate_frac_low=masked_mean(1.0 - high, batch.mask),
            gate_weight_mean=masked_mean(weights, batch.mask),
        )
        return loss, metrics


def _check_low_entropy_weight(value: float | str) -> None:
    if isinstance(value, str):
        if value != PHI_CHORD:
            raise ValueError(f"low_entropy_weight must be a float in [0, 1] or {PHI_CHORD!r}, got {value!r}")
    elif not 0 <= value <= 1:
        raise ValueError(f"low_entropy_weight must be in [0, 1], got {value}")
