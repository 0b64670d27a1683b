"""What the trainer expects of a loss: call signatures, so any class with them plugs in by class_path."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor

from egspo.losses.batch import LossOutput, TokenBatch


@runtime_checkable
class PolicyLoss(Protocol):
    """An RL loss on response tokens: `loss(batch) -> LossOutput`."""

    def __call__(self, batch: TokenBatch) -> LossOutput: ...


@runtime_checkable
class SFTLoss(Protocol):
    """A loss on expert tokens: `loss(logprobs [B, T], mask [B, T]) -> LossOutput`."""

    def __call__(self, logprobs: Tensor, mask: Tensor) -> LossOutput: ...
