"""EGSPO: entropy-gated selective policy optimization (arXiv 2602.03309)."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from .aggregation import masked_mean
from .batch import TokenBatch
from .gate import EntropyGate
from .ppo import ClippedPolicyLoss, clip_metrics

PHI_CHORD = "p(1-p)"


class EGSPOLoss(ClippedPolicyLoss):
    """Entropy-gated PPO: ``loss = -aggregate(w_t * PPO_t)``.

    ``w_t = 1`` for tokens at or above the gate threshold (uncertain "forking" tokens get the
    full update) and ``phi`` below it (confident tokens get an attenuated one). Both branches
    keep ``A_t``, so a wrong answer's tokens are always pushed down. Gated-out tokens still count
    in the aggregation denominator.

    Args:
        gate: threshold rule and hard/soft form; None means ``EntropyGate()`` (quantile 0.8). A
            ``normalized`` gate's ``vocab_size`` left None is filled by :meth:`setup`.
        low_entropy_weight: ``phi`` in ``[0, 1]``, or ``"p(1-p)"`` for the CHORD-phi form
            ``sg(p_t (1 - p_t))`` with ``p_t = exp(logprobs_t)`` under the current policy.
        **kwargs: ``clip_low``, ``clip_high``, ``dual_clip``, ``loss_agg_mode``, ``norm_constant``,
            ``beta``, ``kl_estimator``, as :class:`~egspo.losses.ppo.ClippedPolicyLoss`.

    The threshold is ``batch.entropy_threshold``: :meth:`prepare` computes it once per rollout batch
    from all its valid tokens (all ranks), so every mini-batch and micro-batch uses the same one.
    Metrics: ``gate_threshold``, ``gate_frac_high`` / ``gate_frac_low`` (fractions of valid tokens
    with ``H >= tau`` / ``H < tau``), ``gate_weight_mean``, plus PPO's metrics.
    """

    def __init__(
        self,
        gate: EntropyGate | None = None,
        low_entropy_weight: float | Literal["p(1-p)"] = 0.1,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        _check_low_entropy_weight(low_entropy_weight)
        self.gate = EntropyGate() if gate is None else gate
        self.low_entropy_weight = low_entropy_weight

    def setup(self, *, vocab_size: int, max_completion_length: int) -> None:
        super().setup(vocab_size=vocab_size, max_completion_length=max_completion_length)
        self.gate.setup(vocab_size=vocab_size)

    def prepare(self, entropy: Tensor) -> Tensor:
        """The gate threshold over the rollout batch's valid-token entropies (1-D, all ranks)."""
        return self.gate.threshold(entropy)

    def policy_term(self, batch: TokenBatch, log_ratio: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        _check_low_entropy_weight(self.low_entropy_weight)
        if batch.entropy_threshold is None:
            raise ValueError(
                "EGSPOLoss needs batch.entropy_threshold: call loss.prepare(entropy) once per rollout "
                "batch (valid tokens of all ranks) and pass its result to every TokenBatch"
            )
        threshold = batch.entropy_threshold.to(batch.entropy.device)
        if self.low_entropy_weight == PHI_CHORD:
            p = torch.exp(batch.logprobs.detach())
            phi: float | Tensor = p * (1.0 - p)
        else:
            phi = float(self.low_entropy_weight)
        weights = self.gate.weights(batch.entropy, threshold, phi)
        clip = self.clip(log_ratio, batch.advantages)
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
