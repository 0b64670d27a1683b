"""SFT losses on expert tokens: plain NLL and CHORD's phi-weighted NLL."""

from __future__ import annotations

import torch
from torch import Tensor

from .aggregation import AggMode, aggregate, check_agg_mode, masked_mean, missing_norm_constant
from .batch import LossOutput


class SFTLoss:
    """Base of the SFT losses: ``loss(logprobs [B, T], mask [B, T]) -> LossOutput``.

    ``loss = aggregate(-w_t log p_t)`` over the expert response tokens (``mask > 0``) with a
    per-token weight ``w_t`` that carries no gradient. Masked positions are replaced by 0 before
    use, so padding never affects the loss or its gradient.
    Metrics: ``nll`` (mean ``-log p_t`` over valid tokens, whatever the aggregation).
    """

    def __init__(self, loss_agg_mode: AggMode = "token-mean", norm_constant: float | None = None) -> None:
        check_agg_mode(loss_agg_mode, norm_constant)
        if missing_norm_constant(loss_agg_mode, norm_constant):
            raise ValueError(
                f"{type(self).__name__}: loss_agg_mode={loss_agg_mode!r} needs norm_constant (Dr.GRPO's "
                "constant, e.g. the maximum demonstration length)"
            )
        self.loss_agg_mode = loss_agg_mode
        self.norm_constant = norm_constant

    def __call__(self, logprobs: Tensor, mask: Tensor) -> LossOutput:
        valid = mask > 0
        logprobs = torch.where(valid, logprobs.float(), 0.0)
        weights, metrics = self.token_weights(logprobs.detach(), mask)
        loss = aggregate(-weights * logprobs, mask, self.loss_agg_mode, norm_constant=self.norm_constant)
        metrics["nll"] = masked_mean(-logprobs, mask)
        return LossOutput(loss=loss, metrics=metrics)

    def token_weights(self, logprobs: Tensor, mask: Tensor) -> tuple[Tensor | float, dict[str, Tensor]]:
        """Per-token weight ``w_t`` of ``-log p_t`` from detached log-probs, and its metrics."""
        raise NotImplementedError


class NLLLoss(SFTLoss):
    """Plain negative log-likelihood: ``aggregate(-log p_t)`` (``w_t = 1``)."""

    def token_weights(self, logprobs: Tensor, mask: Tensor) -> tuple[Tensor | float, dict[str, Tensor]]:
        return 1.0, {}


class ChordPhiLoss(SFTLoss):
    """CHORD-phi SFT loss: ``aggregate(-sg(p_t (1 - p_t)) log p_t)``, ``p_t = exp(logprobs_t)``.

    The weight vanishes for tokens the policy already predicts surely (``p -> 1``) and for
    tokens far from its distribution (``p -> 0``), so expert data refines without overwriting.
    Metrics: ``nll``, ``phi_weight_mean`` (mean ``p(1-p)`` over valid tokens).
    """

    def token_weights(self, logprobs: Tensor, mask: Tensor) -> tuple[Tensor | float, dict[str, Tensor]]:
        p = torch.exp(logprobs)
        weights = p * (1.0 - p)
        return weights, {"phi_weight_mean": masked_mean(weights, mask)}
