"""ESPO: entropy-grouped sequence-level importance ratios with entropy-adaptive clipping."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .aggregation import masked_mean
from .base import PolicyLoss
from .batch import TokenBatch
from .kl import KLEstimator
from .ppo import clip_metrics, clipped_objective

# rho * n is computed in float64 and nudged down before ceil, so rho=0.2, n=10 gives 2, not 3.
_ROUNDING_SLACK = 1e-9


class ESPOLoss(PolicyLoss):
    """Per sequence, tokens are split into a high-entropy group and the rest; each group gets
    its own importance ratio and clip range.

    For sequence i with ``n_i`` valid tokens, the high group holds its ``k_i = ceil(rho * n_i)``
    highest-entropy valid tokens (so at least 1 when ``n_i >= 1``; ties broken by position,
    earlier first), the low group the other ``n_i - k_i``. For each group g:

    - group ratio ``s_g = exp(mean_{t in g} log r_t)`` (geometric mean of the token ratios);
    - token ratio ``sg(s_g) * exp(logp_t - sg(logp_t))``: value ``s_g``, gradient per token
      (:func:`group_token_log_ratio`, shared with GSPO);
    - symmetric clip range ``eps_g = alpha * mean_{t in g} H_t / log|V|``;
    - per-token ``PPO_t`` with that ratio and ``eps_g``, averaged over the group's tokens.

    A sequence's loss is the mean over its non-empty groups; the batch loss is the mean over
    sequences with at least one valid token. The KL term (``beta > 0``) uses
    ``seq-mean-token-mean`` to match this sequence-level averaging; that is also the loss's
    ``loss_agg_mode``, so ``aggregation_units`` counts sequences, the unit of the mean.

    Against GSPO (:class:`~egspo.losses.GSPOLoss`): GSPO is the one-group case (the whole
    response is the group, ``s_i``), with a fixed clip range (3e-4 / 4e-4) instead of
    ``eps_g``; the token-ratio code is the same function.

    Args:
        high_entropy_fraction: rho in (0, 1].
        alpha: scale of the entropy-adaptive clip range.
        vocab_size: |V|; may be left None for :meth:`setup` to fill from the model, but must be set
            before the loss is called.
        beta, kl_estimator: as :class:`PPOClipLoss`.

    Metrics: ``clip_frac_low``, ``clip_frac_high``, ``clip_frac_dual`` (always 0), ``ratio_mean``
    (of the group ratios, per token), ``high_entropy_frac`` (fraction of valid tokens in the high
    group), ``eps_high_entropy_group`` / ``eps_low_entropy_group`` (mean clip range over
    sequences where the group is non-empty), ``pg_loss``, ``approx_kl`` (+ ``kl``).
    """

    def __init__(
        self,
        high_entropy_fraction: float = 0.2,
        alpha: float = 0.02,
        vocab_size: int | None = None,
        beta: float = 0.0,
        kl_estimator: KLEstimator = "k3",
    ) -> None:
        super().__init__(loss_agg_mode="seq-mean-token-mean", beta=beta, kl_estimator=kl_estimator)
        if not 0 < high_entropy_fraction <= 1:
            raise ValueError(f"high_entropy_fraction must be in (0, 1], got {high_entropy_fraction}")
        if not alpha >= 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        _check_vocab_size(vocab_size)
        self.high_entropy_fraction = high_entropy_fraction
        self.alpha = alpha
        self.vocab_size = vocab_size

    def setup(self, *, vocab_size: int, max_completion_length: int) -> None:
        super().setup(vocab_size=vocab_size, max_completion_length=max_completion_length)
        if self.vocab_size is None:
            self.vocab_size = vocab_size

    def high_entropy_groups(self, entropy: Tensor, mask: Tensor) -> Tensor:
        """Bool ``[B, T]``: the valid tokens in each sequence's high-entropy group."""
        valid = mask > 0
        n = valid.sum(dim=-1)
        k = torch.ceil(n.double() * self.high_entropy_fraction - _ROUNDING_SLACK).long()
        k = torch.minimum(k.clamp(min=1), n)
        key = torch.where(valid, entropy, torch.full_like(entropy, -math.inf))
        order = torch.argsort(key, dim=-1, descending=True, stable=True)
        positions = torch.arange(entropy.shape[-1], device=entropy.device).expand_as(order)
        rank = torch.empty_like(order).scatter_(-1, order, positions)
        return valid & (rank < k.unsqueeze(-1))

    def policy_term(self, batch: TokenBatch, log_ratio: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        if self.vocab_size is None:
            raise ValueError("ESPOLoss.vocab_size is None: set it, or call loss.setup(vocab_size=..., ...)")
        _check_vocab_size(self.vocab_size)
        valid = batch.mask > 0
        high = self.high_entropy_groups(batch.entropy, batch.mask)
        groups = torch.stack([high, valid & ~high])  # [2, B, T]
        counts = groups.sum(dim=-1)  # [2, B]
        nonempty = counts > 0
        denom = counts.clamp(min=1)

        def group_mean(x: Tensor) -> Tensor:  # [B, T] -> per group and sequence [2, B]
            return torch.where(groups, x, 0.0).sum(dim=-1) / denom

        def per_token(per_group: Tensor) -> Tensor:  # [2, B] -> the token's group value [B, T]
            return torch.where(high, per_group[0].unsqueeze(-1), per_group[1].unsqueeze(-1))

        token_log_ratio = group_token_log_ratio(log_ratio, batch.logprobs, groups)
        eps_groups = self.alpha * group_mean(batch.entropy) / math.log(self.vocab_size)
        eps = per_token(eps_groups)
        clip = clipped_objective(token_log_ratio, batch.advantages, eps, eps)

        group_loss = group_mean(-clip.objective)  # [2, B]; 0 for empty groups
        seq_loss = group_loss.sum(dim=0) / nonempty.sum(dim=0).clamp(min=1)
        loss = seq_loss.sum() / valid.any(dim=-1).sum().clamp(min=1)

        metrics = clip_metrics(clip, batch.mask)
        eps_means = (torch.where(nonempty, eps_groups, 0.0).sum(-1) / nonempty.sum(-1).clamp(min=1)).detach()
        metrics.update(
            high_entropy_frac=masked_mean(high.float(), batch.mask),
            eps_high_entropy_group=eps_means[0],
            eps_low_entropy_group=eps_means[1],
        )
        return loss, metrics


def group_token_log_ratio(log_ratio: Tensor, logprobs: Tensor, groups: Tensor) -> Tensor:
    """Log of the GSPO-token ratio ``sg(s_g) * pi_t / sg(pi_t)`` of every token, ``[B, T]``.

    ``groups`` is bool ``[G, B, T]``: disjoint token groups per sequence (GSPO: one group, the
    response; ESPO: the high- and low-entropy groups). For the group g holding token t,
    ``log s_g = mean_{u in g} log r_u`` (the log of the geometric mean of the token ratios) and
    the result is ``sg(log s_g) + logp_t - sg(logp_t)``: value ``log s_g``, gradient 1 wrt
    ``logp_t``, so ``d s / d logp_t = s_g`` per token. Tokens in no group get 0.
    """
    counts = groups.sum(dim=-1).clamp(min=1)  # [G, B]
    group_log = torch.where(groups, log_ratio.detach(), 0.0).sum(dim=-1) / counts  # [G, B]
    per_token = (groups * group_log.unsqueeze(-1)).sum(dim=0)  # [B, T]; groups are disjoint
    # sg(log s) is added last: logp - sg(logp) is exactly 0 in value, so no precision is lost.
    return logprobs - logprobs.detach() + per_token


def _check_vocab_size(vocab_size: int | None) -> None:
    if vocab_size is not None and vocab_size < 2:
        raise ValueError(f"vocab_size must be >= 2, got {vocab_size}")
