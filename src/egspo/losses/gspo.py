"""GSPO: group sequence policy optimization (Zheng et al. 2025, arXiv 2507.18071), GSPO-token form."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from .aggregation import AggMode
from .batch import TokenBatch
from .espo import group_token_log_ratio
from .ppo import ClippedPolicyLoss, clip_metrics


class GSPOLoss(ClippedPolicyLoss):
    """PPO's clipped surrogate on a sequence-level importance ratio.

    Formula card (response i with valid tokens ``t = 1..n_i``, ``r_t = pi_t / pi_old,t``):

    - sequence ratio ``s_i = exp((1/n_i) sum_t log r_t)``, the geometric mean of the token ratios
      (length-normalised, so its range does not grow with the length);
    - GSPO-token ratio ``s_i,t = sg(s_i) * pi_t / sg(pi_t)``: value ``s_i`` on every token, gradient
      ``s_i * grad log pi_t`` per token (:func:`~egspo.losses.espo.group_token_log_ratio`);
    - per token ``min(s_i,t A_t, clip(s_i,t, 1-eps_l, 1+eps_h) A_t)``; with one advantage per
      response (GRPO) every token of a response is in the same clip region, so the clip acts on
      whole sequences (GSPO); per-token advantages are allowed (the paper's GSPO-token);
    - ``loss = -aggregate(...)``, by default ``seq-mean-token-mean`` (each response weighs the same).

    Defaults as the GSPO paper (v2, section 5.1) and verl's GSPO recipe: ``clip_low=3e-4``,
    ``clip_high=4e-4`` (the sequence ratio moves far less than token ratios do), no dual clip,
    ``loss_agg_mode="seq-mean-token-mean"`` (verl's ``compute_policy_loss_gspo``; TRL:
    ``importance_sampling_level="sequence"``). ``|log r_t|`` is clamped at 20 before the mean
    (the shared loss shell), so ``s_i`` stays finite.

    Against ESPO (:class:`~egspo.losses.ESPOLoss`): the same ratio code with one group per response
    instead of two entropy groups, and a fixed clip range instead of ESPO's entropy-scaled one.

    Args:
        **kwargs: ``clip_low``, ``clip_high``, ``dual_clip``, ``loss_agg_mode``, ``norm_constant``,
            ``beta``, ``kl_estimator``, as :class:`~egspo.losses.ppo.ClippedPolicyLoss`.

    Metrics: ``clip_frac_low`` / ``clip_frac_high`` / ``clip_frac_dual`` (fractions of valid tokens;
    with per-response advantages, the fraction of clipped responses' tokens), ``ratio_mean`` (mean of
    ``s_i`` over valid tokens), ``seq_clip_frac`` (fraction of responses with a clipped token),
    ``pg_loss``, ``approx_kl`` (+ ``kl``).
    """

    def __init__(
        self,
        *,
        clip_low: float = 3e-4,
        clip_high: float = 4e-4,
        loss_agg_mode: AggMode = "seq-mean-token-mean",
        **kwargs: Any,
    ) -> None:
        super().__init__(clip_low=clip_low, clip_high=clip_high, loss_agg_mode=loss_agg_mode, **kwargs)

    def policy_term(self, batch: TokenBatch, log_ratio: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        valid = batch.mask > 0
        token_log_ratio = group_token_log_ratio(log_ratio, batch.logprobs, valid.unsqueeze(0))
        clip = self.clip(token_log_ratio, batch.advantages)
        metrics = clip_metrics(clip, batch.mask)
        clipped = (clip.clipped_low | clip.clipped_high | clip.dual_clipped) & valid
        responses = valid.any(dim=-1)
        metrics["seq_clip_frac"] = (
            clipped.any(dim=-1)[responses].float().mean() if responses.any() else batch.mask.new_zeros(())
        ).detach()
        return self.aggregate(-clip.objective, batch.mask), metrics
