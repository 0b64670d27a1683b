"""Clip-Cov and KL-Cov: entropy-collapse remedies on the log-prob/advantage covariance (arXiv 2505.22617)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from egspo.distributed import gather_variable

from .aggregation import AggMode, masked_mean
from .base import PolicyLoss
from .batch import TokenBatch
from .kl import KLEstimator
from .ppo import check_clip_args, clip_metrics, clipped_objective


class CovariancePolicyLoss(PolicyLoss):
    """Shared part of Clip-Cov and KL-Cov: the per-token covariance and its rollout-batch statistics.

    Cui et al. 2025 show that, under a softmax policy, entropy falls with the covariance between a
    token's log-prob and its advantage. Per valid token t of the rollout batch (N tokens, all ranks)::

        Cov_t = (sg(logp_t) - mean_N(logp)) * (A_t - mean_N(A))

    Centring, and what holds under micro-batching. verl centres over the tokens of each call (a
    micro-batch of one rank), so its covariances, and the counts derived from them, change with the
    micro-batch split. egspo fixes them once per rollout batch: :meth:`prepare_rollout_tokens`, called by
    the update before its first optimizer step on the batch (a collective: every rank calls it), takes
    the valid tokens' rollout log-probs and advantages of every rank and fixes ``mean_N(logp)``,
    ``mean_N(A)``, ``N`` and the subclass's selection constants. ``Cov_t`` is then a function of the
    token alone, so the loss keeps the micro-batch invariant of :class:`PolicyLoss` (Clip-Cov: given
    its random draws, see there). The means use the rollout policy's log-probs; ``Cov_t`` uses the
    current ``logp_t`` (as verl), equal to the rollout's at the first optimizer step on the batch.
    With rollout-mismatch weights (``batch.is_weights``) each token's gradient is scaled by ``w_t``
    (:class:`PolicyLoss`); ``Cov_t``, the means and the selections use the unweighted values.
    """

    needs_rollout_tokens = True

    def __init__(
        self,
        *,
        loss_agg_mode: AggMode = "token-mean",
        norm_constant: float | None = None,
        beta: float = 0.0,
        kl_estimator: KLEstimator = "k3",
    ) -> None:
        super().__init__(
            loss_agg_mode=loss_agg_mode, norm_constant=norm_constant, beta=beta, kl_estimator=kl_estimator
        )
        self.logprob_mean: float | None = None
        self.advantage_mean: float | None = None
        self.num_tokens: int | None = None

    def prepare_rollout_tokens(self, logprobs: Tensor, advantages: Tensor) -> None:
        """Fix the centring and selection of this rollout batch from this rank's valid tokens.

        ``logprobs`` (the rollout policy's) and ``advantages`` are 1-D over this rank's valid
        tokens, in the same order. A collective when distributed: every rank calls it once per
        rollout batch, before the first loss on it.
        """
        # Rounded to float32 as the loss sees them (it computes in float32), then in float64: a token
        # whose log-prob has not moved gets bit for bit the covariance it had here.
        logprobs = logprobs.detach().float().double().flatten()
        advantages = advantages.detach().float().double().flatten()
        if logprobs.shape != advantages.shape:
            raise ValueError(
                f"prepare_rollout_tokens: logprobs {tuple(logprobs.shape)} and advantages "
                f"{tuple(advantages.shape)} must hold the same valid tokens"
            )
        local = torch.stack([logprobs.sum(), advantages.sum(), logprobs.new_tensor(float(logprobs.numel()))])
        totals = gather_variable(local).reshape(-1, 3).sum(dim=0)
        n = int(totals[2].item())
        self.num_tokens = n
        self.logprob_mean = float(totals[0] / max(n, 1))
        self.advantage_mean = float(totals[1] / max(n, 1))
        local_cov = (logprobs - self.logprob_mean) * (advantages - self.advantage_mean)
        self.fix_selection(gather_variable(local_cov))

    def fix_selection(self, covariance: Tensor) -> None:
        """Subclass hook: the selection constants from every valid token's ``Cov_t`` (1-D, all ranks)."""
        raise NotImplementedError

    def covariance(self, batch: TokenBatch) -> Tensor:
        """``Cov_t`` of every position of a sanitised batch, ``[B, T]`` in float64, no gradient."""
        if self.logprob_mean is None or self.advantage_mean is None:
            raise ValueError(
                f"{type(self).__name__} needs the rollout batch's covariance statistics: call "
                "loss.prepare_rollout_tokens(logprobs, advantages) once per rollout batch (valid tokens, "
                "all ranks) before the loss"
            )
        logprobs, advantages = batch.logprobs.detach().double(), batch.advantages.detach().double()
        return (logprobs - self.logprob_mean) * (advantages - self.advantage_mean)


class ClipCovLoss(CovariancePolicyLoss):
    """PPO-clip whose gradient is cut on a small random share of high-covariance tokens.

    Formula card (``Cov_t`` as :class:`CovariancePolicyLoss`, ``PPO_t`` PPO's clipped surrogate):

    - candidates: valid tokens with ``clip_cov_lb < Cov_t < clip_cov_ub`` that PPO's clip has not
      already cut (verl drops those: ``clip_by_origin``);
    - verl draws exactly ``k = max(1, floor(clip_cov_ratio * N))`` of them at random (per call). egspo
      keeps each candidate independently with probability ``p = min(1, k / C)``, where ``C`` is the
      number of candidates of the rollout batch (all ranks) at :meth:`prepare_rollout_tokens` (on-policy,
      no PPO clip yet): ``k`` in expectation, and a per-token rule, so the loss is micro-batch
      additive given the draws. The draws ``u_t ~ U(0, 1)`` come from the loss's own seeded
      ``torch.Generator`` (state in :meth:`state_dict`, restored on resume), one per position of each
      call, so a different micro-batch split draws differently; the law of the selection does not
      change;
    - selected tokens (``u_t < p``) contribute ``sg(PPO_t)``: their gradient is 0 (verl multiplies
      the token's loss by 0: the same gradient, value 0 instead of ``PPO_t``); others ``PPO_t``;
    - ``loss = -aggregate(...)``.

    Defaults (the paper, Sec. 4, and verl's ``policy_loss`` names): ``clip_cov_ratio=2e-4``,
    ``clip_cov_lb=1.0``, ``clip_cov_ub=5.0``; PPO's range at verl's actor defaults
    ``clip_low = clip_high = 0.2`` (the paper's recipe widens it to ``clip_ratio_low =
    clip_ratio_high = 1`` with dual clip 10, leaving the covariance clip as the main brake; set
    ``clip_low`` just below 1 for that), ``token-mean``. ``seed`` seeds the generator; every rank
    holds the same stream (their tokens differ).

    Args:
        clip_cov_ratio: share of valid tokens to detach, in (0, 1].
        clip_cov_lb, clip_cov_ub: the covariance window, ``lb < ub``.
        clip_low, clip_high, dual_clip: PPO's clip, as :class:`~egspo.losses.ppo.ClippedPolicyLoss`.
        seed: seed of the selection's generator.
        loss_agg_mode, norm_constant, beta, kl_estimator: as :class:`~egspo.losses.PolicyLoss`.

    Metrics: ``cov_clip_frac`` (fraction of valid tokens detached, verl's ``pg_clipfrac``),
    ``cov_candidate_frac``, ``cov_select_prob`` (``p``), ``cov_mean`` (mean ``Cov_t``), PPO's clip
    metrics, ``pg_loss``, ``approx_kl`` (+ ``kl``).
    """

    def __init__(
        self,
        *,
        clip_cov_ratio: float = 2e-4,
        clip_cov_lb: float = 1.0,
        clip_cov_ub: float = 5.0,
        clip_low: float = 0.2,
        clip_high: float = 0.2,
        dual_clip: float | None = None,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        check_clip_args(clip_low, clip_high, dual_clip)
        if not 0 < clip_cov_ratio <= 1:
            raise ValueError(f"clip_cov_ratio must be in (0, 1], got {clip_cov_ratio}")
        if not clip_cov_lb < clip_cov_ub:
            raise ValueError(f"clip_cov_lb must be < clip_cov_ub, got {clip_cov_lb} and {clip_cov_ub}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {seed!r}")
        self.clip_cov_ratio = clip_cov_ratio
        self.clip_cov_lb = clip_cov_lb
        self.clip_cov_ub = clip_cov_ub
        self.clip_low, self.clip_high, self.dual_clip = clip_low, clip_high, dual_clip
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self.select_prob: float | None = None

    def fix_selection(self, covariance: Tensor) -> None:
        n = covariance.numel()
        candidates = int(((covariance > self.clip_cov_lb) & (covariance < self.clip_cov_ub)).sum())
        target = max(1, int(self.clip_cov_ratio * n)) if n else 0
        self.select_prob = min(1.0, target / candidates) if candidates else 0.0

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if "generator" in state:
            self.generator.set_state(state["generator"].to("cpu", torch.uint8))

    def policy_term(self, batch: TokenBatch, log_ratio: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        cov = self.covariance(batch)
        valid = batch.mask > 0
        clip = clipped_objective(log_ratio, batch.advantages, self.clip_low, self.clip_high, self.dual_clip)
        cut_by_ppo = clip.clipped_low | clip.clipped_high | clip.dual_clipped
        candidates = valid & ~cut_by_ppo & (cov > self.clip_cov_lb) & (cov < self.clip_cov_ub)
        draws = torch.rand(cov.shape, generator=self.generator, dtype=torch.float64).to(cov.device)
        selected = candidates & (draws < float(self.select_prob))
        objective = torch.where(selected, clip.objective.detach(), clip.objective)
        metrics = clip_metrics(clip, batch.mask)
        metrics.update(
            cov_clip_frac=masked_mean(selected.float(), batch.mask),
            cov_candidate_frac=masked_mean(candidates.float(), batch.mask),
            cov_select_prob=batch.mask.new_tensor(float(self.select_prob)),
            cov_mean=masked_mean(cov, batch.mask),
        )
        return self.aggregate(-objective, batch.mask), metrics


class KLCovLoss(CovariancePolicyLoss):
    """Policy gradient with a KL penalty on the top share of tokens by covariance.

    Formula card (``r_t = exp(logp_t - old_logp_t)``, ``Cov_t`` as :class:`CovariancePolicyLoss`):

    - ``k = max(1, floor(kl_cov_ratio * N))`` and ``c_k`` the k-th largest ``Cov_t`` of the rollout
      batch (all ranks), fixed by :meth:`prepare_rollout_tokens` (verl: the top k of each call);
    - selected tokens ``Cov_t >= c_k`` (ties at ``c_k`` included): ``r_t A_t - ppo_kl_coef * |log r_t|``;
      others ``r_t A_t``; no ratio clip (the paper's and verl's ``kl_cov``);
    - ``loss = -aggregate(...)``.

    On-policy (``r = 1``) this is plain ``-aggregate(A_t)`` in value and REINFORCE in gradient: the
    penalty ``|log r|`` is 0 with gradient 0 there, and pulls selected tokens back towards the
    rollout policy once the ratio moves.

    Defaults: ``kl_cov_ratio=2e-3``, ``ppo_kl_coef=1.0`` (the paper's 7B setting and verl's entropy
    recipe; verl's code falls back to ``kl_cov_ratio=2e-4``, the paper's 32B value), ``token-mean``.

    Args:
        kl_cov_ratio: share of valid tokens to penalise, in (0, 1].
        ppo_kl_coef: weight of ``|log r_t|`` on them, >= 0.
        loss_agg_mode, norm_constant, beta, kl_estimator: as :class:`~egspo.losses.PolicyLoss`.

    Metrics: ``kl_cov_frac`` (fraction of valid tokens penalised), ``cov_threshold`` (``c_k``),
    ``cov_mean``, ``ratio_mean``, ``abs_log_ratio`` (mean ``|log r|``, verl's ``ppo_kl``), ``pg_loss``,
    ``approx_kl`` (+ ``kl``).
    """

    def __init__(self, *, kl_cov_ratio: float = 2e-3, ppo_kl_coef: float = 1.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not 0 < kl_cov_ratio <= 1:
            raise ValueError(f"kl_cov_ratio must be in (0, 1], got {kl_cov_ratio}")
        if not ppo_kl_coef >= 0:
            raise ValueError(f"ppo_kl_coef must be >= 0, got {ppo_kl_coef}")
        self.kl_cov_ratio = kl_cov_ratio
        self.ppo_kl_coef = ppo_kl_coef
        self.cov_threshold: float | None = None

    def fix_selection(self, covariance: Tensor) -> None:
        n = covariance.numel()
        if n == 0:
            self.cov_threshold = float("inf")
            return
        k = min(max(1, int(self.kl_cov_ratio * n)), n)
        self.cov_threshold = float(torch.topk(covariance, k).values[-1])

    def policy_term(self, batch: TokenBatch, log_ratio: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        cov = self.covariance(batch)
        selected = (batch.mask > 0) & (cov >= self.cov_threshold)
        ratio = torch.exp(log_ratio)
        penalty = torch.where(selected, self.ppo_kl_coef * log_ratio.abs(), 0.0)
        objective = ratio * batch.advantages - penalty
        metrics = {
            "kl_cov_frac": masked_mean(selected.float(), batch.mask),
            "cov_mean": masked_mean(cov, batch.mask),
            "ratio_mean": masked_mean(ratio, batch.mask),
            "abs_log_ratio": masked_mean(log_ratio.abs(), batch.mask),
        }
        if math.isfinite(self.cov_threshold):  # inf: a rollout batch without valid tokens
            metrics["cov_threshold"] = batch.mask.new_tensor(self.cov_threshold)
        return self.aggregate(-objective, batch.mask), metrics
