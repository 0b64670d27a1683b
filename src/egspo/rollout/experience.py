"""The experience batch: everything the update loop needs about one round of rollouts."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor


@dataclass
class Experience:
    """Scored rollouts. Token tensors are `[N, C]` over completion positions (N = prompts x G)."""

    input_ids: Tensor  # [N, P + C]
    attention_mask: Tensor  # [N, P + C]
    completion_mask: Tensor  # [N, C] float
    old_logprobs: Tensor | None  # [N, C]; None: equal to the current policy's (single update)
    entropy: Tensor  # [N, C], of the sampling distribution, no grad
    advantages: Tensor  # [N]
    rewards: Tensor  # [N]
    truncated: Tensor  # [N] bool
    prompt_length: int
    ref_logprobs: Tensor | None = None  # [N, C]
    correct: Tensor | None = None  # [N] bool: right final answer
    completions: list[str] | None = None  # decoded, for diagnostics

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def score_mask(self) -> Tensor:
        """`[N, P + C]` mask of the completion tokens inside the full sequence."""
        prompt = self.completion_mask.new_zeros(len(self), self.prompt_length)
        return torch.cat([prompt, self.completion_mask], dim=1)

    def minibatches(self, size: int, generator: torch.Generator | None = None) -> Iterator[Experience]:
        """Shuffled mini-batches of `size` sequences; `size` must divide the batch."""
        n = len(self)
        if size >= n:
            yield self
            return
        if n % size:
            raise ValueError(f"mini_batch_size={size} does not divide the rollout batch of {n} sequences")
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, size):
            yield self.select(order[start : start + size])

    def select(self, index: Tensor) -> Experience:
        """The rows `index`, trimmed of completion columns that are padding in all of them."""
        index = index.to(self.input_ids.device)
        values = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Tensor):
                value = value[index]
            elif isinstance(value, list):
                value = [value[i] for i in index.tolist()]
            values[f.name] = value
        sub = replace(self, **values)
        return sub.trim()

    def trim(self) -> Experience:
        """Drop trailing completion columns that no row uses (saves compute on short answers)."""
        used = (
            int(self.completion_mask.sum(0).nonzero().max().item()) + 1 if self.completion_mask.any() else 1
        )
        if used == self.completion_mask.shape[1]:
            return self
        width = self.prompt_length + used
        values = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Tensor) and value.dim() == 2:
                values[f.name] = (
                    value[:, :width] if value.shape[1] == self.input_ids.shape[1] else value[:, :used]
                )
        return replace(self, **values)
