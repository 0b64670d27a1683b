"""Schulman's estimators of KL(pi || pi_ref) from tokens sampled by pi.

With ``d = log pi_ref(y_t) - log pi(y_t)`` (so ``E_pi[exp(d)] = 1``):

- ``k1 = -d``: unbiased, high variance, can be negative per token.
- ``k2 = d^2 / 2``: biased, low variance, >= 0; its gradient is that of the true KL.
- ``k3 = exp(d) - 1 - d``: unbiased, low variance, >= 0.

http://joschu.net/blog/kl-approx.html
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import Tensor

KLEstimator = Literal["k1", "k2", "k3"]
KL_ESTIMATORS: tuple[str, ...] = get_args(KLEstimator)

# k3 grows like exp(d); the log-ratio is clamped before exp and the result capped, so a token
# whose reference log-prob is far off yields a bounded (zero-gradient) penalty instead of inf.
K3_LOG_RATIO_CLAMP = 20.0
K3_MAX = 10.0


def check_kl_estimator(estimator: str) -> None:
    """Raise a ValueError naming the option if ``estimator`` is unknown."""
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: KLEstimator = "k3") -> Tensor:
    """Per-token KL estimate ``[B, T]``; gradient flows through ``logprobs``.

    For ``k3`` the log-ratio ``d`` is clamped to ``[-20, 20]`` and the estimate to
    ``[0, 10]`` (the lower bound only removes rounding below 0; k3 >= 0 exactly).
    """
    check_kl_estimator(estimator)
    log_ratio = ref_logprobs.float() - logprobs.float()
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    log_ratio = log_ratio.clamp(-K3_LOG_RATIO_CLAMP, K3_LOG_RATIO_CLAMP)
    return (torch.exp(log_ratio) - 1.0 - log_ratio).clamp(min=0.0, max=K3_MAX)
