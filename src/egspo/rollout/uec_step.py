"""UEC-RL's targeted exploration as one step of experience building: sample hard prompts again at
the exploration temperature and join those samples to the batch (the rules are
`egspo.rollout.exploration`'s; this file only drives them)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from egspo.distributed import any_rank
from egspo.rollout.engine import SamplingParams
from egspo.rollout.experience import Experience, concat_rows
from egspo.rollout.exploration import (
    Scale,
    UECConfig,
    exploration_advantages,
    hard_prompts,
    select_exploration_samples,
)
from egspo.rollout.groups import Groups

Sample = Callable[[list[str], list[str], SamplingParams], Groups]
# (groups, sampling temperature, advantages, excluded rows) -> their scored experience
ToExperience = Callable[[Groups, float, Tensor, Tensor], Experience]


def explore_hard_prompts(
    groups: Groups,
    experience: Experience,
    *,
    uec: UECConfig,
    params: SamplingParams,
    group_size: int,
    temperature: float,
    scale: Scale,
    sample: Sample,
    to_experience: ToExperience,
    stats: dict[str, float],
) -> Experience:
    """`params.num_samples` more samples of each hard prompt at `params.temperature`, scored at that
    temperature, joined to `experience` (sampled at `temperature`).

    Advantages of a hard prompt's regular and expanded samples are taken over the joint group;
    regular rows are kept where their advantage is non-zero, expanded ones where it is >= 0 (by
    default; `uec` names the rules). Every process samples when any has a hard prompt (a sharded
    model generates in lock-step): one without samples its first prompt and discards it.
    """
    g = group_size
    hard = hard_prompts(groups.rewards, groups.correct, g, uec.hard_rule)
    index = hard.nonzero().flatten().tolist()
    experience.temperature = torch.full_like(experience.rewards, float(temperature))
    stats["uec/hard_prompts"] = len(index) / len(hard)
    if not any_rank(bool(index)):
        return experience
    pick = index or [0]
    expanded = sample([groups.questions[i * g] for i in pick], [groups.answers[i * g] for i in pick], params)
    if not index:
        return experience
    advantages, expanded_advantages = exploration_advantages(
        experience.rewards, expanded.rewards, hard, g, params.num_samples, scale=scale,
        advantage_group=uec.advantage_group,
    )  # fmt: skip
    keep, keep_expanded = select_exploration_samples(
        advantages, expanded_advantages, regular_keep=uec.regular_keep, expanded_keep=uec.expanded_keep
    )
    experience.advantages = advantages
    experience.excluded = experience.excluded | ~keep
    explored = to_experience(expanded, params.temperature, expanded_advantages, ~keep_expanded)
    explored.temperature = torch.full_like(expanded.rewards, params.temperature)
    stats["uec/expanded_success"] = float(expanded.correct.float().mean())
    stats["uec/expanded_kept"] = float(keep_expanded.float().mean())
    return concat_rows([experience, explored], params.pad_token_id)
