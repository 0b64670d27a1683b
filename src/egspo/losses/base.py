"""Shared shell of every policy loss: input sanitising, the optional KL term, common metrics."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from .aggregation import AggMode, aggregate, check_agg_mode, masked_mean
from .batch import LossOutput, TokenBatch
from .kl import KLEstimator, check_kl_estimator, kl_penalty

# |log r| beyond this is clamped before exp: exp(20) ~ 5e8 is still finite in fp32 and far
# outside any clip range, so no gradient is lost that a clip would not remove anyway.
LOG_RATIO_CLAMP = 20.0


class PolicyLoss:
    """Base of the policy losses: ``loss(batch) -> LossOutput``, minimised.

    ``loss = L_pg + beta * aggregate(KL_t)`` where ``L_pg`` is the subclass's policy term and
    ``KL_t`` the chosen estimator of KL(pi || pi_ref) (needs ``batch.ref_logprobs``).
    All computation is float32. Masked positions of every input are replaced by 0 with
    ``torch.where`` before any arithmetic, so padding (even inf/NaN) never changes the loss
    and receives exactly zero gradient.

    Metrics common to all policy losses: ``pg_loss`` (policy term), ``approx_kl``
    (mean of ``(log r)^2 / 2`` over valid tokens, KL to the rollout policy), and ``kl``
    (the aggregated reference KL, only when ``beta > 0``).
    """

    def __init__(
        self,
        *,
        loss_agg_mode: AggMode = "token-mean",
        norm_constant: float | None = None,
        beta: float = 0.0,
        kl_estimator: KLEstimator = "k3",
    ) -> None:
        check_agg_mode(loss_agg_mode, norm_constant)
        check_kl_estimator(kl_estimator)
        if not beta >= 0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        self.loss_agg_mode = loss_agg_mode
        self.norm_constant = norm_constant
        self.beta = beta
        self.kl_estimator = kl_estimator

    def __call__(self, batch: TokenBatch) -> LossOutput:
        if self.beta > 0 and batch.ref_logprobs is None:
            raise ValueError(
                f"{type(self).__name__} has beta={self.beta} > 0 but batch.ref_logprobs is None; "
                "compute reference log-probs or set beta=0"
            )
        batch = sanitize(batch)
        log_ratio = (batch.logprobs - batch.old_logprobs).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        pg_loss, metrics = self.policy_loss(batch, log_ratio)
        metrics["pg_loss"] = pg_loss.detach()
        metrics["approx_kl"] = masked_mean(0.5 * log_ratio.square(), batch.mask)
        loss = pg_loss
        if self.beta > 0:
            kl = kl_penalty(batch.logprobs, batch.ref_logprobs, self.kl_estimator)
            kl_loss = self.aggregate(kl, batch.mask)
            metrics["kl"] = kl_loss.detach()
            loss = loss + self.beta * kl_loss
        return LossOutput(loss=loss, metrics=metrics)

    def policy_loss(self, batch: TokenBatch, log_ratio: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Policy term and its metrics, from a sanitised batch and ``log r = logp - old_logp``."""
        raise NotImplementedError

    def aggregate(self, values: Tensor, mask: Tensor) -> Tensor:
        """``aggregate`` with this loss's ``loss_agg_mode`` and ``norm_constant``."""
        return aggregate(values, mask, self.loss_agg_mode, norm_constant=self.norm_constant)


def sanitize(batch: TokenBatch) -> TokenBatch:
    """Float32 copy of ``batch`` with 0 at every masked position (gradient-safe, unlike ``* mask``)."""
    valid = batch.mask > 0
    zero = torch.zeros((), dtype=torch.float32, device=batch.mask.device)

    def clean(x: Tensor | None) -> Tensor | None:
        return None if x is None else torch.where(valid, x.float(), zero)

    threshold = batch.entropy_threshold
    return replace(
        batch,
        logprobs=clean(batch.logprobs),
        old_logprobs=clean(batch.old_logprobs),
        advantages=clean(batch.advantages),
        entropy=clean(batch.entropy),
        mask=valid.float(),
        ref_logprobs=clean(batch.ref_logprobs),
        entropy_threshold=None if threshold is None else threshold.float().reshape(()),
    )
