"""Containers passed to and returned by the losses."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from torch import Tensor


@dataclass
class TokenBatch:
    """Per-token inputs of a policy loss, all ``[B, T]``.

    ``mask`` is 1 on response tokens and 0 on prompt/padding; every other field may hold
    anything (even inf/NaN) at masked positions, the losses never read it there.
    ``advantages`` is per token (a sequence advantage broadcast over its tokens).
    ``entropy`` is the sampling policy's predictive entropy in nats, without grad.
    ``entropy_threshold`` (scalar, nats) is the gate threshold of gated losses, computed once per
    rollout batch by ``loss.prepare`` over all ranks' tokens and shared by every mini-batch.
    ``polarity`` is the entropy polarity of each token (``token_logprobs(..., with_polarity=True)``),
    without grad, for losses with ``needs_polarity``.
    ``is_weights`` are the rollout-mismatch importance weights ``w_t`` (``egspo.losses.mismatch``),
    without grad; each token's policy-gradient term is multiplied by them (None: all 1).
    """

    logprobs: Tensor
    old_logprobs: Tensor
    advantages: Tensor
    entropy: Tensor
    mask: Tensor
    ref_logprobs: Tensor | None = None
    entropy_threshold: Tensor | None = None
    polarity: Tensor | None = None
    is_weights: Tensor | None = None

    def __post_init__(self) -> None:
        if self.mask.dim() != 2:
            raise ValueError(f"TokenBatch.mask must be [B, T], got shape {tuple(self.mask.shape)}")
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "entropy_threshold":
                if value is not None and value.numel() != 1:
                    raise ValueError(
                        f"TokenBatch.entropy_threshold must be a scalar, got shape {tuple(value.shape)}"
                    )
            elif value is not None and value.shape != self.mask.shape:
                raise ValueError(
                    f"TokenBatch.{f.name} has shape {tuple(value.shape)}, "
                    f"expected the mask's shape {tuple(self.mask.shape)}"
                )


@dataclass
class LossOutput:
    """A scalar loss to minimise and detached scalar metrics (names without prefix)."""

    loss: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)
