"""The experience batch: everything the update needs about one round of rollouts."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor


@dataclass
class Experience:
    """Scored rollouts. Token tensors are `[N, C]` over completion positions (N = prompts x G).

    `entropy` is the predictive entropy of the distribution each token was sampled from (the
    rollout policy at the sampling temperature), known from the moment of sampling; the gate
    threshold is computed from it once per rollout batch. `old_logprobs` is None when the
    update makes a single optimizer step per rollout batch: the rollout policy is then the
    current one and the ratio is exactly 1. `excluded` rows (overlong filtering) stay in the
    batch for statistics but carry no loss.
    """

    input_ids: Tensor  # [N, P + C]
    attention_mask: Tensor  # [N, P + C]
    completion_mask: Tensor  # [N, C] float
    entropy: Tensor  # [N, C], no grad
    advantages: Tensor  # [N]
    rewards: Tensor  # [N]
    truncated: Tensor  # [N] bool
    prompt_length: int
    old_logprobs: Tensor | None = None  # [N, C]
    ref_logprobs: Tensor | None = None  # [N, C]
    correct: Tensor | None = None  # [N] bool: right final answer
    excluded: Tensor | None = None  # [N] bool: rows left out of the loss
    completions: list[str] | None = None  # decoded, for diagnostics

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def loss_mask(self) -> Tensor:
        """`[N, C]` mask of the tokens that carry loss: completion tokens of rows not excluded."""
        if self.excluded is None:
            return self.completion_mask
        return self.completion_mask * (~self.excluded).to(self.completion_mask.dtype)[:, None]

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

    def microbatches(self, max_tokens: int | None) -> list[Experience]:
        """This batch packed into micro-batches of at most `max_tokens` attended tokens each.

        First-fit decreasing on the rows' token counts (prompt and completion). A row longer
        than the budget gets a micro-batch of its own. None: the batch itself.
        """
        if max_tokens is None:
            return [self]
        return [self.select(rows) for rows in pack_rows(self.attention_mask.sum(1), max_tokens)]

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
        return replace(self, **values).trim()

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


def pack_rows(lengths: Tensor, max_tokens: int) -> list[Tensor]:
    """Row indices grouped so that each group's `lengths` sum to at most `max_tokens`.

    First-fit decreasing: few groups, and rows of similar length land together (less padding).
    Groups come out in a fixed order for a given input, so every rank packs alike.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    order = torch.argsort(lengths, descending=True, stable=True).tolist()
    sizes = lengths.tolist()
    bins: list[list[int]] = []
    room: list[int] = []
    for row in order:
        for b, free in enumerate(room):
            if sizes[row] <= free:
                bins[b].append(row)
                room[b] -= sizes[row]
                break
        else:
            bins.append([row])
            room.append(max_tokens - sizes[row])
    return [torch.tensor(sorted(b), dtype=torch.long) for b in bins]
