"""Shared shell of every policy loss: its lifecycle, input sanitising, the optional KL term, common metrics."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, ClassVar

import torch
from torch import Tensor

from .aggregation import AggMode, aggregate, check_agg_mode, masked_mean, missing_norm_constant
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

    Lifecycle, driven by the trainer:

    1. :meth:`setup` once, when the model is known: fills the options left at None.
    2. :meth:`prepare` once per rollout batch, with the entropies of all its valid tokens (all ranks):
       returns the gate threshold of gated losses and updates stateful controllers.
    3. ``loss(batch)`` per mini-batch or micro-batch. It is a pure function of the batch and of the
       state fixed by ``prepare``, and every mode is a sum over tokens divided by
       :func:`~egspo.losses.aggregation.aggregation_units`, so micro-batch losses weighted by their
       share of units add up to the single-pass loss.
    4. :meth:`state_dict` / :meth:`load_state_dict` for checkpoints.

    Losses that read ``batch.polarity`` set the class attribute ``needs_polarity = True``, so the
    trainer scores with ``with_polarity=True``.

    Rollout-mismatch correction: ``batch.is_weights`` (``w_t``, no gradient) multiply the gradient
    of each token's policy-gradient term, for every loss: the policy term sees
    ``logp_t + (w_t - 1) (logp_t - sg(logp_t))``, equal to ``logp_t`` in value (ratios, clip
    regions, gates, group ratios and token selections are unchanged) with gradient ``w_t``. Every
    loss reaches the parameters only through ``logp_t``, so token t's contribution to the gradient
    is scaled by ``w_t``: for PPO-style losses that is ``grad(w_t PPO_t)``; for ESPO / GSPO the
    token's term inside its group's mean (the group ratio's value stays the trainer's). Reported
    values (``pg_loss``) are unweighted; the KL-to-reference term is not weighted.

    Metrics common to all policy losses: ``pg_loss`` (policy term), ``approx_kl``
    (mean of ``(log r)^2 / 2`` over valid tokens, KL to the rollout policy), and ``kl``
    (the aggregated reference KL, only when ``beta > 0``).
    """

    needs_polarity: ClassVar[bool] = False
    # Losses that fix statistics of the whole rollout batch's tokens before its first step (the
    # covariance losses) set this, and the update calls `prepare_rollout_tokens` for them alone: it
    # may cost a scoring pass that no other loss needs.
    needs_rollout_tokens: ClassVar[bool] = False

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

    # ------------------------------------------------------------------ lifecycle
    def setup(self, *, vocab_size: int, max_completion_length: int) -> None:
        """Fill the options left at None from the model and the run: called once by the trainer.

        Dr.GRPO's ``norm_constant`` (``loss_agg_mode='seq-mean-token-sum-norm'``) becomes
        ``max_completion_length``. Subclasses fill their own (``vocab_size``). Options set explicitly
        are kept.
        """
        _check_int("vocab_size", vocab_size, minimum=2)
        _check_int("max_completion_length", max_completion_length, minimum=1)
        if missing_norm_constant(self.loss_agg_mode, self.norm_constant):
            self.norm_constant = float(max_completion_length)

    def prepare(self, entropy: Tensor) -> Tensor | None:
        """Per-rollout-batch step, from the entropies (nats, 1-D) of all its valid tokens, all ranks.

        Returns the gate threshold (a scalar tensor) for gated losses, passed to every mini-batch as
        ``TokenBatch.entropy_threshold``; None here (no gate).
        """
        return None

    def prepare_rollout_tokens(self, logprobs: Tensor, advantages: Tensor) -> None:
        """Per-rollout-batch step of a loss with ``needs_rollout_tokens``, from the rollout-policy
        log-probs and advantages (1-D) of the valid tokens of this rank (a collective: every rank calls it)."""

    def state_dict(self) -> dict[str, Any]:
        """The loss's training state, in plain types and tensors (empty: stateless)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; a key this loss does not have is an error, not ignored."""
        unknown = set(state) - set(self.state_dict())
        if unknown:
            raise ValueError(f"{type(self).__name__}.load_state_dict: unknown keys {sorted(unknown)}")

    # ------------------------------------------------------------------ the loss
    def __call__(self, batch: TokenBatch) -> LossOutput:
        name = type(self).__name__
        if missing_norm_constant(self.loss_agg_mode, self.norm_constant):
            raise ValueError(
                f"{name} has loss_agg_mode={self.loss_agg_mode!r} but norm_constant is None: call "
                "loss.setup(vocab_size=..., max_completion_length=...) or set norm_constant"
            )
        if self.beta > 0 and batch.ref_logprobs is None:
            raise ValueError(
                f"{name} has beta={self.beta} > 0 but batch.ref_logprobs is None; "
                "compute reference log-probs or set beta=0"
            )
        if self.needs_polarity and batch.polarity is None:
            raise ValueError(
                f"{name} needs batch.polarity: score with token_logprobs(..., with_polarity=True)"
            )
        batch = sanitize(batch)
        pg_batch = batch
        if batch.is_weights is not None:
            # logp_t + (w_t - 1) (logp_t - sg(logp_t)): the same value, exactly; gradient w_t.
            lp = batch.logprobs
            pg_batch = replace(batch, logprobs=lp + (batch.is_weights.detach() - 1.0) * (lp - lp.detach()))
        log_ratio = (pg_batch.logprobs - batch.old_logprobs).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        pg_loss, metrics = self.policy_term(pg_batch, log_ratio)
        metrics["pg_loss"] = pg_loss.detach()
        metrics["approx_kl"] = masked_mean(0.5 * log_ratio.square(), batch.mask)
        loss = pg_loss
        if self.beta > 0:
            kl = kl_penalty(batch.logprobs, batch.ref_logprobs, self.kl_estimator)
            kl_loss = self.aggregate(kl, batch.mask)
            metrics["kl"] = kl_loss.detach()
            loss = loss + self.beta * kl_loss
        return LossOutput(loss=loss, metrics=metrics)

    def policy_term(self, batch: TokenBatch, log_ratio: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Policy term and its metrics, from a sanitised batch and ``log r = logp - old_logp``."""
        raise NotImplementedError

    def aggregate(self, values: Tensor, mask: Tensor) -> Tensor:
        """``aggregate`` with this loss's ``loss_agg_mode`` and ``norm_constant``."""
        return aggregate(values, mask, self.loss_agg_mode, norm_constant=self.norm_constant)


def _check_int(name: str, value: int, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


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
        polarity=clean(batch.polarity),
        is_weights=clean(batch.is_weights),
    )
