"""PAPO: polarity-aware policy optimization (arXiv 2605.11775), as PPO with polarity-branch weights."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .aggregation import masked_mean
from .batch import TokenBatch
from .ppo import ClippedPolicyLoss, clip_metrics


class PAPOLoss(ClippedPolicyLoss):
    """Polarity-aware PPO: ``loss = -aggregate(w_t * PPO_t)``, ``w_t`` set by the token's entropy polarity.

    Formula card. What the paper states (Zhang et al., "Entropy Polarity in Reinforcement Fine-Tuning:
    Direction, Asymmetry, and Control", arXiv 2605.11775; from its abstract and secondary summaries,
    the full text was not reachable): a first-order approximation of the entropy change of a sampled
    update, made of a sampled-token contribution and a state-wise distributional correction, defines
    the *entropy polarity*, a signed token-level quantity that predicts whether and how much the
    update expands or contracts entropy; reinforcing frequent high-probability tokens contracts it,
    expansion needs lower-probability samples or a stronger correction. PAPO keeps both polarity
    branches and controls entropy by *advantage reweighting*, using the empirical entropy trajectory
    as an online phase signal to move optimization pressure between entropy-expanding and
    entropy-contracting updates. The exact weights and controller are not public here.

    What egspo computes (every choice below is an option):

    - Polarity (exact for a softmax policy; ``batch.polarity``, from the fused scoring pass at the
      sampling temperature, current policy, no gradient)::

          P_t = p_a (log p_a + H) - sum_j p_j^2 (log p_j + H)       a = the sampled token

      A policy-gradient step ``eta * A_t * grad log p_a`` on the logits changes the entropy of that
      state by ``dH_t ~ -eta * A_t * P_t``; ``E_{a ~ p}[P_t] = 0``.
    - Branches: entropy-expanding if ``-A_t P_t > 0``, entropy-contracting if ``-A_t P_t < 0``
      (tokens with ``A_t P_t = 0`` move nothing and keep weight 1).
    - Weights: ``w_t = 1 + b`` on expanding tokens, ``1 - b`` on contracting ones, with the balance
      ``|b| <= max_balance < 1``, so both branches always keep a positive weight. As ``w_t > 0``,
      ``w_t * PPO_t(A_t) = PPO_t(w_t A_t)`` with the same clip regions: this *is* advantage
      reweighting. The weights depend on the token alone (no per-batch normalisation), so
      micro-batching stays exact.
    - Controller, in :meth:`prepare` once per rollout batch ``k`` with mean valid-token entropy
      ``H_k``: reference ``R_k = target_entropy`` if set, else the EMA (``ema_decay``) of
      ``H_1..H_{k-1}`` (the entropy trajectory; ``R_1 = H_1``), and an integral step
      ``b_k = clip(b_{k-1} + gain * (R_k - H_k) / R_k, -max_balance, max_balance)``: entropy below
      its reference (collapse) moves weight to expanding tokens, above it to contracting ones.

    Defaults: eps_l = eps_h = 0.2, target_entropy None (EMA, decay 0.9), gain 1.0, max_balance 0.5.

    Args:
        target_entropy: ``R`` in nats (> 0), or None to follow the EMA of past rollout batches.
        ema_decay: weight of the past in the EMA reference, in ``[0, 1)``.
        gain: step of the balance per unit relative entropy error, >= 0 (0 freezes ``b`` at 0).
        max_balance: bound on ``|b|``, in ``[0, 1)``.
        **kwargs: ``clip_low``, ``clip_high``, ``dual_clip``, ``loss_agg_mode``, ``norm_constant``,
            ``beta``, ``kl_estimator``, as :class:`~egspo.losses.ppo.ClippedPolicyLoss`.

    Metrics (valid tokens of the batch): ``polarity_frac_expand`` / ``polarity_frac_contract``
    (branch fractions), ``polarity_weight_expand`` / ``polarity_weight_contract`` (``1 +/- b``),
    ``predicted_entropy_change`` (mean of ``-w_t A_t P_t``: the first-order entropy change of the
    batch's states per unit logit step; its sign, not its scale, compares with the observed one),
    ``entropy_reference`` (``R`` of the last :meth:`prepare`) and, from the second rollout batch on,
    ``observed_entropy_change`` (``H_k - H_{k-1}``: the effect of iteration ``k-1``'s updates, so
    compare it with the ``predicted_entropy_change`` logged at ``k-1``), plus PPO's metrics.
    """

    needs_polarity = True

    def __init__(
        self,
        target_entropy: float | None = None,
        ema_decay: float = 0.9,
        gain: float = 1.0,
        max_balance: float = 0.5,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if target_entropy is not None and not (math.isfinite(target_entropy) and target_entropy > 0):
            raise ValueError(
                f"target_entropy must be None or a finite number of nats > 0, got {target_entropy}"
            )
        if not 0 <= ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
        if not (math.isfinite(gain) and gain >= 0):
            raise ValueError(f"gain must be finite and >= 0, got {gain}")
        if not 0 <= max_balance < 1:
            raise ValueError(
                f"max_balance must be in [0, 1) (both branches keep a weight > 0), got {max_balance}"
            )
        self.target_entropy = target_entropy
        self.ema_decay = ema_decay
        self.gain = gain
        self.max_balance = max_balance
        # controller state (see state_dict)
        self.balance = 0.0
        self.entropy_ema: float | None = None
        self.entropy_reference: float | None = None
        self.last_entropy: float | None = None
        self.observed_entropy_change: float | None = None

    def prepare(self, entropy: Tensor) -> None:
        """One controller step from the rollout batch's valid-token entropies (1-D, all ranks)."""
        values = entropy.detach().float().flatten()
        if values.numel() == 0:
            return
        current = float(values.mean())
        if self.target_entropy is not None:
            reference = self.target_entropy
        else:
            reference = current if self.entropy_ema is None else self.entropy_ema
        if reference > 0:
            step = self.gain * (reference - current) / reference
            self.balance = min(max(self.balance + step, -self.max_balance), self.max_balance)
        if self.last_entropy is not None:
            self.observed_entropy_change = current - self.last_entropy
        ema = self.entropy_ema
        self.entropy_ema = current if ema is None else self.ema_decay * ema + (1 - self.ema_decay) * current
        self.entropy_reference = reference
        self.last_entropy = current

    def state_dict(self) -> dict[str, Any]:
        return {
            "balance": self.balance,
            "entropy_ema": self.entropy_ema,
            "entropy_reference": self.entropy_reference,
            "last_entropy": self.last_entropy,
            "observed_entropy_change": self.observed_entropy_change,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        for name, value in state.items():
            setattr(self, name, None if value is None else float(value))

    def policy_term(self, batch: TokenBatch, log_ratio: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        predicted = -batch.advantages * batch.polarity.detach()  # dH_t / eta, to first order
        expand, contract = predicted > 0, predicted < 0
        w_expand, w_contract = 1.0 + self.balance, 1.0 - self.balance
        weights = torch.where(expand, w_expand, torch.where(contract, w_contract, 1.0))
        clip = self.clip(log_ratio, batch.advantages)
        loss = self.aggregate(-weights * clip.objective, batch.mask)
        metrics = clip_metrics(clip, batch.mask)
        metrics.update(
            polarity_frac_expand=masked_mean(expand.float(), batch.mask),
            polarity_frac_contract=masked_mean(contract.float(), batch.mask),
            polarity_weight_expand=batch.mask.new_tensor(w_expand),
            polarity_weight_contract=batch.mask.new_tensor(w_contract),
            predicted_entropy_change=masked_mean(weights * predicted, batch.mask),
        )
        if self.entropy_reference is not None:
            metrics["entropy_reference"] = batch.mask.new_tensor(self.entropy_reference)
        if self.observed_entropy_change is not None:
            metrics["observed_entropy_change"] = batch.mask.new_tensor(self.observed_entropy_change)
        return loss, metrics
