"""Entropy gate: which response tokens get a full policy update."""

from __future__ import annotations

import math
from typing import Literal, Protocol, get_args, runtime_checkable

import torch
from torch import Tensor

GateRule = Literal["quantile", "absolute", "normalized"]
GATE_RULES: tuple[str, ...] = get_args(GateRule)
DEFAULT_VALUE = 0.8  # quantile and normalized rules: the top 20% of tokens (or of log|V|) get full updates


class EntropyGate:
    """Threshold ``tau`` (nats) on the predictive entropy ``H_t`` and the per-token weight.

    Rules for ``tau``:

    - ``quantile``: the ``value``-quantile of ``H`` over the valid tokens given to :meth:`threshold`
      (linear interpolation, as ``torch.quantile``); ``value=0.8`` gives the top 20% of tokens full
      updates.
    - ``absolute``: ``tau = value`` nats.
    - ``normalized``: ``H / log|V| >= value``, i.e. ``tau = value * log(vocab_size)``; ``vocab_size``
      may be left None for :meth:`setup` to fill from the model.

    Weight: hard gate ``w = 1 if H >= tau else phi``; soft gate
    ``w = phi + (1 - phi) * sigmoid((H - tau) / temperature)`` (temperature in nats).

    ``value`` is what a schedule drives during training, through :meth:`set_value`; it has one
    writer: left None (0.8 for the quantile and normalized rules) it is the schedule's to set, and
    a run that sets it here and schedules it too is refused before it starts.
    """

    def __init__(
        self,
        rule: GateRule = "quantile",
        value: float | None = None,
        soft: bool = False,
        temperature: float = 0.1,
        vocab_size: int | None = None,
    ) -> None:
        if value is None and rule == "absolute":
            raise ValueError("gate rule='absolute' needs a value: the threshold in nats")
        self.rule = rule
        self.value = DEFAULT_VALUE if value is None else value
        self.soft = soft
        self.temperature = temperature
        self.vocab_size = vocab_size
        self.validate()

    def validate(self) -> None:
        """Raise a ValueError naming the offending option (``vocab_size`` may still be None)."""
        if self.rule not in GATE_RULES:
            raise ValueError(f"gate rule must be one of {GATE_RULES}, got {self.rule!r}")
        _check_value(self.rule, self.value)
        if self.vocab_size is not None and self.vocab_size < 2:
            raise ValueError(f"gate vocab_size must be >= 2, got {self.vocab_size}")
        if not self.temperature > 0:
            raise ValueError(f"gate temperature must be > 0, got {self.temperature}")

    def setup(self, *, vocab_size: int) -> None:
        """Fill ``vocab_size`` from the model if it was left None (called by the loss's ``setup``)."""
        if self.vocab_size is None:
            self.vocab_size = vocab_size
        self.validate()

    def set_value(self, value: float) -> None:
        """Set the gate's ``value`` (quantile, nats or fraction of ``log|V|``, by rule), validated first.

        What a schedule (``GateScheduler``) calls; a bad value raises and leaves the gate unchanged.
        """
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"gate value must be a float, got {type(value).__name__} {value!r}")
        _check_value(self.rule, float(value))
        self.value = float(value)

    def threshold(self, entropy: Tensor, mask: Tensor | None = None) -> Tensor:
        """Scalar threshold ``tau`` in nats (float32, detached); 0 for ``quantile`` with no valid token.

        ``entropy`` holds the entropies of the whole rollout batch (all ranks), either the valid
        ones only (1-D, ``mask`` None, as ``PolicyLoss.prepare`` receives them) or any shape with a
        ``mask`` of valid positions.
        """
        self.validate()
        if self.rule == "absolute":
            return torch.tensor(float(self.value), device=entropy.device)
        if self.rule == "normalized":
            if self.vocab_size is None:
                raise ValueError(
                    "gate rule='normalized' needs vocab_size (entropy is divided by log|V|): set it, "
                    "or call loss.setup(vocab_size=..., ...)"
                )
            return torch.tensor(self.value * math.log(self.vocab_size), device=entropy.device)
        values = entropy.detach().float()
        return _quantile(values.flatten() if mask is None else values[mask > 0], self.value)

    def weights(self, entropy: Tensor, threshold: Tensor, low_weight: float | Tensor) -> Tensor:
        """Per-token weight ``w_t`` in ``[phi, 1]`` (``phi = low_weight``, float or tensor)."""
        if not self.soft:
            return torch.where(entropy >= threshold, torch.ones_like(entropy), low_weight)
        gate = torch.sigmoid((entropy - threshold) / self.temperature)
        return low_weight + (1.0 - low_weight) * gate


@runtime_checkable
class HasEntropyGate(Protocol):
    """A loss with an entropy gate (``isinstance(loss, HasEntropyGate)``): what a gate schedule drives."""

    gate: EntropyGate


def _check_value(rule: str, value: float) -> None:
    if rule in ("quantile", "normalized") and not 0 <= value <= 1:
        raise ValueError(f"gate value must be in [0, 1] for rule={rule!r}, got {value}")
    if rule == "absolute" and not (value >= 0 and math.isfinite(value)):
        raise ValueError(f"gate value must be finite and >= 0 nats for rule='absolute', got {value}")


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
