"""Groups of samples, and DAPO's sample-level techniques on them: dynamic sampling, soft overlong punishment.

A group is the `num_generations` samples of one prompt, consecutive rows of a batch; its
group-relative advantage is zero when all its samples scored alike.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from egspo.distributed import any_rank
from egspo.rollout.engine import Rollout
from egspo.rollout.experience import concat_rows, take_rows

# More prompts for dynamic sampling: `refill(round)` gives the questions and gold answers of a
# further batch of candidate prompts (a pure function of the iteration and the round).
Refill = Callable[[int], tuple[list[str], list[str]]]


@dataclass
class Groups:
    """Sampled and rewarded rows: `num_generations` consecutive rows per prompt, then any rows a
    method added (`egspo.methods`), each with its sampling temperature and advantage group."""

    rollout: Rollout
    questions: list[str]  # per row
    answers: list[str]  # per row
    completions: list[str]
    rewards: Tensor  # [N] float32, verifiable reward
    correct: Tensor  # [N] bool
    metrics: dict[str, float]
    prompts_over_length: int
    temperature: Tensor | None = None  # [N] float32 sampling temperature (None: all the rollout's)
    group: Tensor | None = None  # [N] long advantage group (None: consecutive groups of num_generations)
    added: Tensor | None = None  # [N] bool: rows a method added beyond the regular samples
    excluded: Tensor | None = None  # [N] bool: rows left out of the loss (dynamic sampling's top-ups)

    def __len__(self) -> int:
        return len(self.completions)


def append_rows(
    groups: Groups, extra: Groups, extra_group: Tensor, group_size: int, pad_token_id: int
) -> Groups:
    """`groups` followed by the rows of `extra` (marked `added`), whose advantage groups are
    `extra_group` (a regular group's index, `row // group_size`, to join it; a new index otherwise).
    Both parts must carry their per-row sampling temperatures."""
    n, m = len(groups), len(extra)
    device = groups.rewards.device
    if groups.temperature is None or extra.temperature is None:
        raise ValueError("append_rows: both parts need their per-row sampling temperature")

    def flags(value: Tensor | None, rows: int, fill: bool) -> Tensor:
        return (
            torch.full((rows,), fill, dtype=torch.bool, device=device) if value is None else value.to(device)
        )

    regular_group = torch.arange(n, device=device) // group_size if groups.group is None else groups.group
    return Groups(
        rollout=concat_rows([groups.rollout, extra.rollout], pad_token_id),
        questions=groups.questions + extra.questions,
        answers=groups.answers + extra.answers,
        completions=groups.completions + extra.completions,
        rewards=torch.cat([groups.rewards, extra.rewards.to(device)]),
        correct=torch.cat([groups.correct, extra.correct.to(device)]),
        metrics=groups.metrics,
        prompts_over_length=groups.prompts_over_length,
        temperature=torch.cat([groups.temperature.to(device), extra.temperature.to(device)]),
        group=torch.cat([regular_group, extra_group.to(device)]),
        added=torch.cat([flags(groups.added, n, False), flags(None, m, True)]),
        excluded=torch.cat([flags(groups.excluded, n, False), flags(extra.excluded, m, False)]),
    )


def dynamic_sampling(
    sample: Callable[[list[str], list[str]], Groups],
    groups: Groups,
    refill: Refill | None,
    num_generations: int,
    max_num_gen_batches: int,
    pad_token_id: int,
) -> tuple[Groups, Tensor, dict[str, float]]:
    """DAPO's dynamic sampling: keep prompts whose samples disagree, refill from fresh prompts.

    The batch keeps its size: if the rounds run out before enough prompts disagree, it is
    topped up with all-equal groups excluded from the loss (they carry no signal, and in a
    token mean they would only dilute the rest). Every process samples as many rounds as the
    one that needs most (a sharded model generates in lock-step); a process that is already
    full discards its extra round.
    """
    g = num_generations
    wanted = len(groups.correct) // g
    pool = [groups]
    rounds = 1
    while rounds < max_num_gen_batches and refill is not None:
        informative = sum(int((~constant_groups(part.rewards, g)).sum()) for part in pool)
        if not any_rank(informative < wanted):
            break
        extra = sample(*refill(rounds))
        rounds += 1
        if informative < wanted:
            pool.append(extra)
    varied = [(part, int(i)) for part in pool for i in (~constant_groups(part.rewards, g)).nonzero()]
    flat = [(part, int(i)) for part in pool for i in constant_groups(part.rewards, g).nonzero()]
    chosen = (varied + flat)[:wanted]
    excluded = torch.tensor([j >= len(varied) for j in range(len(chosen)) for _ in range(g)])
    stats = {
        "rollout/sampling_rounds": float(rounds),
        "rollout/informative_groups": min(len(varied), wanted) / wanted,
        "rollout/round_cap_hit": float(len(varied) < wanted),
    }
    merged = merge_groups(chosen, g, pad_token_id)
    return merged, excluded.to(groups.correct.device), stats


def overlong_penalty(lengths: Tensor, max_length: int, buffer: int, factor: float = 1.0) -> Tensor:
    """DAPO's soft overlong punishment, added to the reward of each sample.

    0 up to `max_length - buffer` tokens, then falling linearly to `-factor` at `max_length`, and
    `-factor` beyond it: `clip(-(|y| - (max_length - buffer)) / buffer * factor, -factor, 0)`.
    Samples cut at the limit get the full `-factor`.
    """
    expected = max_length - buffer
    return (-(lengths.float() - expected) / buffer * factor).clamp(min=-factor, max=0.0)


def constant_groups(rewards: Tensor, group_size: int) -> Tensor:
    """`[prompts]` bool: the groups whose samples all have the same reward (zero advantage)."""
    grouped = rewards.view(-1, group_size)
    return grouped.amax(dim=1) == grouped.amin(dim=1)


def merge_groups(chosen: list[tuple[Groups, int]], g: int, pad: int) -> Groups:
    """Groups picked from several sampling rounds as one batch (`concat_rows` re-pads them).
    Reward-function metrics are those of the first round."""
    parts = [(part, torch.arange(i * g, (i + 1) * g)) for part, i in chosen]
    return Groups(
        rollout=concat_rows([take_rows(part.rollout, index) for part, index in parts], pad),
        questions=[part.questions[i] for part, index in parts for i in index.tolist()],
        answers=[part.answers[i] for part, index in parts for i in index.tolist()],
        completions=[part.completions[i] for part, index in parts for i in index.tolist()],
        rewards=torch.cat([part.rewards[index] for part, index in parts]),
        correct=torch.cat([part.correct[index] for part, index in parts]),
        metrics=chosen[0][0].metrics,
        prompts_over_length=chosen[0][0].prompts_over_length,
    )
