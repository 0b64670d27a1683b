"""The experience batch: everything the update needs about one round of rollouts."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields, replace
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor

T = TypeVar("T")


@dataclass
class Experience:
    """Scored rollouts. Token tensors are `[N, C]` over completion positions (N = prompts x G).

    `entropy` is the predictive entropy of the distribution each token was sampled from (the
    rollout policy at the sampling temperature), known from the moment of sampling; the gate
    threshold is computed from it once per rollout batch. `old_logprobs` is None when the
    update makes a single optimizer step per rollout batch: the rollout policy is then the
    current one and the ratio is exactly 1. `excluded` rows (overlong filtering) stay in the
    batch for statistics but carry no loss. `temperature`, when set, is each row's sampling
    temperature (UEC-RL samples hard prompts hotter): its log-probs are scored at it.
    `is_weights` are the truncated importance weights of an engine whose log-probs are not the
    trainer's (`egspo.losses.mismatch`): each token's policy-gradient term is multiplied by them.
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
    temperature: Tensor | None = None  # [N] sampling temperature per row (None: the rollout's)
    is_weights: Tensor | None = None  # [N, C] rollout-mismatch importance weights (None: all 1)
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

    def minibatches(self, count: int, generator: torch.Generator | None = None) -> Iterator[Experience]:
        """The rows shuffled into `count` mini-batches whose sizes differ by at most one row.

        Rows beyond a multiple of `count` (UEC-RL joins extra samples of hard prompts to a batch)
        are spread over the mini-batches, so the number of optimizer steps stays what was configured.
        """
        n = len(self)
        if count <= 1:
            yield self
            return
        order = torch.randperm(n, generator=generator)
        for rows in order.tensor_split(min(count, n)):
            yield self.select(rows)

    def microbatches(self, max_tokens: int | None) -> list[Experience]:
        """This batch packed into micro-batches of at most `max_tokens` attended tokens each, one
        sampling temperature per micro-batch.

        First-fit decreasing on the rows' token counts (prompt and completion). A row longer
        than the budget gets a micro-batch of its own. None: one micro-batch per temperature.
        """
        if self.temperature is not None and len(self.temperature.unique()) > 1:
            parts = [
                self.select((self.temperature == t).nonzero().flatten()) for t in self.temperature.unique()
            ]
            return [mb for part in parts for mb in part.microbatches(max_tokens)]
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


def take_rows(batch: T, index: Tensor) -> T:
    """The rows `index` of a `Rollout` or an `Experience` (every per-row tensor and list), untrimmed."""
    values = {}
    for f in fields(batch):
        value = getattr(batch, f.name)
        if isinstance(value, Tensor):
            values[f.name] = value[index.to(value.device)]
        elif isinstance(value, list):
            values[f.name] = [value[i] for i in index.tolist()]
    return replace(batch, **values)


def concat_rows(parts: Sequence[T], pad_token_id: int) -> T:
    """Several `Rollout`s or `Experience`s as one, rows in order: prompts re-padded on the left,
    completions on the right.

    `input_ids` and `attention_mask` (`[N, P + C]`) are split at each part's prompt length and
    padded on both sides; other `[N, C]` tensors on the right with 0 (`input_ids` with
    `pad_token_id`); `[N]` tensors and lists are concatenated. A field that is None in every part
    stays None; `excluded` set in some parts only counts as "none excluded" in the others; any
    other field present in some parts only is an error.
    """
    if not parts:
        raise ValueError("concat_rows needs at least one part")
    prompt_width = max(p.prompt_length for p in parts)
    width = max(p.completion_mask.shape[1] for p in parts)
    values: dict = {"prompt_length": prompt_width}
    for f in fields(parts[0]):
        if f.name == "prompt_length":
            continue
        items = [getattr(p, f.name) for p in parts]
        if all(v is None for v in items):
            values[f.name] = None
            continue
        if any(v is None for v in items):
            if f.name != "excluded":
                raise ValueError(f"cannot concatenate batches where {f.name} is set in some parts only")
            items = [
                torch.zeros(len(p.truncated), dtype=torch.bool) if v is None else v
                for p, v in zip(parts, items, strict=True)
            ]
        if isinstance(items[0], list):
            values[f.name] = [x for v in items for x in v]
            continue
        pad = pad_token_id if f.name == "input_ids" else 0
        pieces = []
        for part, v in zip(parts, items, strict=True):
            p, c = part.prompt_length, part.completion_mask.shape[1]
            if f.name in ("input_ids", "attention_mask"):
                prompt = F.pad(v[:, :p], (prompt_width - p, 0), value=pad)
                v = torch.cat([prompt, F.pad(v[:, p:], (0, width - c), value=pad)], dim=1)
            elif v.dim() == 2:
                v = F.pad(v, (0, width - c), value=pad)
            pieces.append(v.to(items[0].device))
        values[f.name] = torch.cat(pieces)
    return type(parts[0])(**values)
