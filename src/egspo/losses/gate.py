"""Entropy gate: which response tokens get a full policy update."""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch
from torch import Tensor

GateRule = Literal["quantile", "absolute", "normalized"]
GATE_RULES: tuple[str, ...] = get_args(GateRule)


class EntropyGate:
    """Threshold ``tau`` (nats) on the predictive entropy ``H_t`` and the per-token weight.

    Rules for ``tau``:

    - ``quantile``: the ``value``-quantile of ``H`` over the valid tokens of the batch given to
      :meth:`threshold` (linear interpolation, as ``torch.quantile``); ``value=0.8`` gives the
      top 20% of tokens full updates.
    - ``absolute``: ``tau = value`` nats.
    - ``normalized``: ``H / log|V| >= value``, i.e. ``tau = value * log(vocab_size)``.

    Weight: hard gate ``w = 1 if H >= tau else phi``; soft gate
    ``w = phi + (1 - phi) * sigmoid((H - tau) / temperature)`` (temperature in nats).

    The knobs are plain attributes, so a scheduler may change ``gate.value`` during training;
    they are re-validated whenever a threshold is computed.
    """

    def __init__(
        self,
        rule: GateRule = "quantile",
        value: float = 0.8,
        soft: bool = False,
        temperature: float = 0.1,
        vocab_size: int | None = None,
    ) -> None:
        self.rule = rule
        self.value = value
        self.soft = soft
        self.temperature = temperature
        self.vocab_size = vocab_size
        self.validate()

    def validate(self) -> None:
        """Raise a ValueError naming the offending option."""
        if self.rule not in GATE_RULES:
            raise ValueError(f"gate rule must be one of {GATE_RULES}, got {self.rule!r}")
        if self.rule in ("quantile", "normalized") and not 0 <= self.value <= 1:
            raise ValueError(f"gate value must be in [0, 1] for rule={self.rule!r}, got {self.value}")
        if self.rule == "absolute" and not self.value >= 0:
            raise ValueError(f"gate value must be >= 0 nats for rule='absolute', got {self.value}")
        if self.rule == "normalized" and (self.vocab_size is None or self.vocab_size < 2):
            raise ValueError(
                f"gate rule='normalized' needs vocab_size >= 2 (entropy is divided by log|V|), "
                f"got vocab_size={self.vocab_size}"
            )
        if not self.temperature > 0:
            raise ValueError(f"gate temperature must be > 0, got {self.temperature}")

    def threshold(self, entropy: Tensor, mask: Tensor) -> Tensor:
        """Scalar threshold ``tau`` in nats (float32, detached); 0 for ``quantile`` with no valid token.

        The trainer calls this once on the entropies of the whole rollout batch (gathered over
        ranks) and passes the result to the loss as ``TokenBatch.entropy_threshold``.
        """
        self.validate()
        if self.rule == "absolute":
            return torch.tensor(float(self.value), device=entropy.device)
        if self.rule == "normalized":
            return torch.tensor(self.value * math.log(self.vocab_size), device=entropy.device)
        return _quantile(entropy.detach().float()[mask > 0], self.value)

    def weights(self, entropy: Tensor, threshold: Tensor, low_weight: float | Tensor) -> Tensor:
        """Per-token weight ``w_t`` in ``[phi, 1]`` (``phi = low_weight``, float or tensor)."""
        if not self.soft:
            return torch.where(entropy >= threshold, torch.ones_like(entropy), low_weight)
        gate = torch.sigmoid((entropy - threshold) / self.temperature)
        return low_weight + (1.0 - low_weight) * gate


def _quantile(values: Tensor, q: float) -> Tensor:
    """``torch.quantile(values, q)`` (linear) without its 2**24-element input limit."""
    n = values.numel()
    if n == 0:
        return values.new_zeros(())
    ordered = values.sort().values
    position = q * (n - 1)
    lo = math.floor(position)
    hi = min(lo + 1, n - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (position - lo)
