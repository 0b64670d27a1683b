"""UEC-RL (arXiv 2604.14646), targeted exploration: which prompts are hard, how the extra samples
drawn at an exploration temperature get advantages, and which samples are kept.

Pure torch. The experience builder samples `exploration_samples` more completions of each hard
prompt at `exploration_temperature`, and uses these rules on the regular and the expanded rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

Scale = Literal["group", "batch", "none"]
HardRule = Literal["no_correct", "all_zero"]
AdvantageGroup = Literal["joint", "separate"]
RegularKeep = Literal["nonzero", "all"]
ExpandedKeep = Literal["nonnegative", "positive"]


@dataclass
class UECConfig:
    """UEC-RL's options: targeted exploration on hard prompts and a replay stabiliser.

    Formula card. What the paper states (Wang, Wei, Zhang, Shao, Dan, Huang, Lan, Wang, "Targeted
    Exploration via Unified Entropy Control for Reinforcement Learning", arXiv 2604.14646, ACL
    Findings 2026, pp. 16789-16802; from the abstract and secondary summaries, the full text and
    code were not reachable): GRPO suffers entropy collapse; UEC-RL "activates more exploration on
    difficult prompts" and "a stabilizer prevents entropy from growing uncontrollably"; summaries
    add that the exploration module expands entropy on difficult prompts "with an exploration
    temperature" and the stabilizer "replays high-advantage trajectories" (arxivlens.com), with
    "adaptive temperature adjustments and replay mechanisms" (emergentmind.com); results: +37.9%
    relative over GRPO on Geometry3K, gains over GRPO, DAPO, KL-cov and Entropy-Adv on seven text
    benchmarks, per-step cost 0.79x GRPO's; exploration temperature and replay budget need tuning.
    A public note (quoted in egspo issue 14; not found by egspo's own searches) gives the
    mechanics: GRPO (clipped surrogate + KL) as the base; for a prompt whose G samples all score 0,
    sample G' more at an exploration temperature t' > 1; keep a regular sample when A != 0 and an
    expanded one only when A >= 0; score expanded samples' log-probs at the temperature they were
    drawn at; keep the latest s' trajectories with A > A0 in a buffer and run a replay update every
    f_replay iterations, with importance ratios against their behaviour policy. No values given.

    What egspo computes (every choice an option; defaults chosen here, not the paper's):

    - Hard prompt (:func:`hard_prompts`): no sample right (``hard_rule="no_correct"``; for binary
      rewards the same as the note's "all score 0", which is ``"all_zero"``).
    - Expansion: ``exploration_samples`` (G'; None = ``num_generations``) more samples of each hard
      prompt at ``exploration_temperature`` (t'), same top-p/top-k.
    - Advantages (:func:`exploration_advantages`): ``advantage_group="joint"`` takes the hard
      prompt's G regular and G' expanded rewards as one group of G + G' (an expanded success then
      pushes the failed regular samples down); ``"separate"`` scores the expanded samples as a
      group of their own. Same ``advantage_scale`` as the rollout.
    - Selection (:func:`select_exploration_samples`): regular rows with ``A != 0``
      (``regular_keep="nonzero"``; ``"all"`` keeps every row), expanded rows with ``A >= 0``
      (``expanded_keep="nonnegative"``; ``"positive"``: ``A > 0``). Rows not kept carry no loss.
    - Temperature: an expanded row's old, reference and current log-probs and its entropy are
      those of ``softmax(logits / t')``; a row is scored at the temperature it was drawn at.
    - Stabiliser (:class:`ReplayBuffer`): the latest ``replay_capacity`` (s') trajectories with
      ``A > replay_min_advantage`` (A0), FIFO; every ``replay_every`` (f_replay) RL iterations
      (:meth:`replay_due`) one extra update on ``replay_batch_size`` of them (None: all), the
      clipped surrogate with the stored advantage and ratio ``exp(logp - logp_behaviour)``.

    Defaults: G' = G, t' = 1.2, joint groups, nonzero / nonnegative, s' = 128, A0 = 1.0 (with group
    scaling and G = 8, the right answers of prompts that at most 3 of 8 samples solved), f_replay 4.
    """

    exploration_samples: int | None = None
    exploration_temperature: float = 1.2
    hard_rule: HardRule = "no_correct"
    advantage_group: AdvantageGroup = "joint"
    regular_keep: RegularKeep = "nonzero"
    expanded_keep: ExpandedKeep = "nonnegative"
    replay_capacity: int = 128
    replay_min_advantage: float = 1.0
    replay_every: int = 4
    replay_batch_size: int | None = None

    def __post_init__(self) -> None:
        checks = {
            "exploration_samples": (
                self.exploration_samples is None or self.exploration_samples >= 1,
                "must be None (= num_generations) or >= 1",
            ),
            "exploration_temperature": (
                math.isfinite(self.exploration_temperature) and self.exploration_temperature > 0,
                "must be finite and > 0 (UEC-RL explores at t' > 1)",
            ),
            "hard_rule": (self.hard_rule in ("no_correct", "all_zero"), "must be 'no_correct' or 'all_zero'"),
            "advantage_group": (
                self.advantage_group in ("joint", "separate"),
                "must be 'joint' or 'separate'",
            ),
            "regular_keep": (self.regular_keep in ("nonzero", "all"), "must be 'nonzero' or 'all'"),
            "expanded_keep": (
                self.expanded_keep in ("nonnegative", "positive"),
                "must be 'nonnegative' or 'positive'",
            ),
            "replay_capacity": (self.replay_capacity >= 0, "must be >= 0 (0: no stabiliser)"),
            "replay_min_advantage": (math.isfinite(self.replay_min_advantage), "must be finite"),
            "replay_every": (self.replay_every >= 1, "must be >= 1"),
            "replay_batch_size": (
                self.replay_batch_size is None or self.replay_batch_size >= 1,
                "must be None (the whole buffer) or >= 1",
            ),
        }
        for name, (ok, rule) in checks.items():
            if not ok:
                raise ValueError(f"UEC-RL option {name}={getattr(self, name)!r}: {rule}")

    def replay_due(self, rl_iteration: int) -> bool:
        """Whether RL iteration ``rl_iteration`` (0-based) ends with a replay update: every
        ``replay_every``-th one. A pure function of the iteration, so a resumed run keeps the rhythm."""
        return self.replay_capacity > 0 and (rl_iteration + 1) % self.replay_every == 0


# ---------------------------------------------------------------------------------- exploration
def hard_prompts(rewards: Tensor, correct: Tensor, group_size: int, rule: HardRule = "no_correct") -> Tensor:
    """``[B]`` bool: the prompts to explore further. ``"no_correct"``: no sample of the group is
    right; ``"all_zero"``: every sample's reward is 0 (the public note's wording)."""
    if rewards.dim() != 1 or rewards.shape != correct.shape or group_size < 1 or rewards.numel() % group_size:
        raise ValueError(
            f"rewards and correct must be [B * {group_size}], got {tuple(rewards.shape)} and {tuple(correct.shape)}"
        )
    if rule == "no_correct":
        return ~correct.bool().view(-1, group_size).any(1)
    if rule == "all_zero":
        return (rewards.view(-1, group_size) == 0).all(1)
    raise ValueError(f"rule must be 'no_correct' or 'all_zero', got {rule!r}")


def exploration_advantages(
    rewards: Tensor,
    expanded_rewards: Tensor,
    hard: Tensor,
    group_size: int,
    expanded_group_size: int,
    *,
    scale: Scale = "group",
    advantage_group: AdvantageGroup = "joint",
    eps: float = 1e-6,
) -> tuple[Tensor, Tensor]:
    """Group-relative advantages of the regular rows ``[B * G]`` and the expanded rows ``[H * G']``.

    ``expanded_rewards`` holds the G' expanded samples of each hard prompt, in the order of the
    hard prompts (``H = hard.sum()``). ``"joint"``: a hard prompt's group is its G regular and G'
    expanded rewards; ``"separate"``: the expanded samples form a group of their own and the
    regular rows keep their usual advantages. Other prompts' groups are unchanged. The formula is
    :func:`egspo.advantages.group_advantages`'s (Bessel std, ``eps``, constant groups exactly 0);
    ``scale="batch"`` divides by the std of all rewards, regular and expanded. With no hard prompt
    the result equals ``group_advantages(rewards, group_size, scale)``.
    """
    b = hard.numel()
    h = int(hard.sum())
    if rewards.shape != (b * group_size,):
        raise ValueError(f"rewards must be [{b} * {group_size}], got {tuple(rewards.shape)}")
    if expanded_rewards.shape != (h * expanded_group_size,):
        raise ValueError(
            f"expanded_rewards must be [{h} hard prompts * {expanded_group_size}], got {tuple(expanded_rewards.shape)}"
        )
    if scale not in ("group", "batch", "none"):
        raise ValueError(f"scale must be 'group', 'batch' or 'none', got {scale!r}")
    if advantage_group not in ("joint", "separate"):
        raise ValueError(f"advantage_group must be 'joint' or 'separate', got {advantage_group!r}")
    regular = rewards.view(b, group_size)
    expanded = expanded_rewards.view(h, expanded_group_size)
    batch_std = torch.cat([rewards, expanded_rewards]).std() if scale == "batch" else None
    advantages = _advantages(regular, scale, batch_std, eps)
    if h == 0:
        return advantages.view(-1), expanded_rewards.new_zeros(0)
    if advantage_group == "separate":
        return advantages.view(-1), _advantages(expanded, scale, batch_std, eps).view(-1)
    joint = _advantages(torch.cat([regular[hard], expanded], dim=1), scale, batch_std, eps)
    advantages[hard] = joint[:, :group_size]
    return advantages.view(-1), joint[:, group_size:].reshape(-1)


def select_exploration_samples(
    advantages: Tensor,
    expanded_advantages: Tensor,
    *,
    regular_keep: RegularKeep = "nonzero",
    expanded_keep: ExpandedKeep = "nonnegative",
) -> tuple[Tensor, Tensor]:
    """The keep masks (bool) of the regular and the expanded rows: UEC-RL's selection rule.

    Regular rows are kept when ``A != 0`` (``"nonzero"``; a zero advantage carries no policy
    gradient) or always (``"all"``). Expanded rows, drawn from a flattened distribution, are kept
    only when ``A >= 0`` (``"nonnegative"``) or ``A > 0`` (``"positive"``): a failure at t' > 1 says
    little about the policy at its own temperature, and pushing down already-unlikely tokens adds
    variance, so expanded samples only ever pull the policy towards what they found.
    """
    if regular_keep == "nonzero":
        keep = advantages != 0
    elif regular_keep == "all":
        keep = torch.ones_like(advantages, dtype=torch.bool)
    else:
        raise ValueError(f"regular_keep must be 'nonzero' or 'all', got {regular_keep!r}")
    if expanded_keep == "nonnegative":
        keep_expanded = expanded_advantages >= 0
    elif expanded_keep == "positive":
        keep_expanded = expanded_advantages > 0
    else:
        raise ValueError(f"expanded_keep must be 'nonnegative' or 'positive', got {expanded_keep!r}")
    return keep, keep_expanded


def _advantages(grouped: Tensor, scale: Scale, batch_std: Tensor | None, eps: float) -> Tensor:
    """``[groups, size]`` advantages, as :func:`egspo.advantages.group_advantages` computes them."""
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale == "group":
        centred = centred / (grouped.std(dim=1, keepdim=True) + eps)
    elif scale == "batch":
        centred = centred / (batch_std + eps)
    constant = grouped.amax(dim=1, keepdim=True) == grouped.amin(dim=1, keepdim=True)
    return centred.masked_fill(constant, 0.0)
