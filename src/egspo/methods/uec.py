"""UEC-RL (arXiv 2604.14646) as an RL-iteration plug-in: targeted exploration of hard prompts and a
replay stabiliser.

The rules (which prompts are hard, which samples are kept) are pure functions below; `UECRL`
applies them at the hooks of `egspo.methods.base`: `extend` samples hard prompts again at the
exploration temperature, `exclude` applies the keep rules once the builder has computed advantages
over the joint groups (after the same reward shaping and filters as every other row), and
`after_update` feeds the replay buffer (`egspo.methods.uec_replay`) and runs its update.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor

from egspo.distributed import all_ranks_agree, any_rank, gather_objects
from egspo.methods.base import Metrics, RLMethod, Sampler, Train
from egspo.methods.uec_replay import ReplayBuffer
from egspo.rollout.engine import SamplingParams
from egspo.rollout.experience import Experience
from egspo.rollout.groups import Groups, append_rows

HardRule = Literal["no_correct", "all_zero"]
AdvantageGroup = Literal["joint", "separate"]
RegularKeep = Literal["nonzero", "all"]
ExpandedKeep = Literal["nonnegative", "positive"]


class UECRL(RLMethod):
    """UEC-RL: targeted exploration on hard prompts and a replay stabiliser.

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

    needs_behaviour_logprobs = True  # the replay buffer stores them, for the importance ratio
    adds_rows = True

    def __init__(
        self,
        exploration_samples: int | None = None,
        exploration_temperature: float = 1.2,
        hard_rule: HardRule = "no_correct",
        advantage_group: AdvantageGroup = "joint",
        regular_keep: RegularKeep = "nonzero",
        expanded_keep: ExpandedKeep = "nonnegative",
        replay_capacity: int = 128,
        replay_min_advantage: float = 1.0,
        replay_every: int = 4,
        replay_batch_size: int | None = None,
    ) -> None:
        self.exploration_samples = exploration_samples
        self.exploration_temperature = exploration_temperature
        self.hard_rule = hard_rule
        self.advantage_group = advantage_group
        self.regular_keep = regular_keep
        self.expanded_keep = expanded_keep
        self.replay_capacity = replay_capacity
        self.replay_min_advantage = replay_min_advantage
        self.replay_every = replay_every
        self.replay_batch_size = replay_batch_size
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
        self.replay = ReplayBuffer(replay_capacity, replay_min_advantage) if replay_capacity > 0 else None

    def replay_due(self, rl_iteration: int) -> bool:
        """Whether RL iteration ``rl_iteration`` (0-based) ends with a replay update: every
        ``replay_every``-th one. A pure function of the iteration, so a resumed run keeps the rhythm."""
        return self.replay_capacity > 0 and (rl_iteration + 1) % self.replay_every == 0

    # ------------------------------------------------------------------ hooks
    def check(self, *, dynamic_sampling: bool) -> list[str]:
        if dynamic_sampling:
            return [
                "model.methods: UEC-RL explores the prompts whose samples all failed, which dynamic "
                "sampling (model.rollout.dynamic_sampling) drops: use one of them"
            ]
        return []

    def extend(
        self, groups: Groups, sample: Sampler, stats: Metrics, *, params: SamplingParams, group_size: int
    ) -> Groups:
        """More samples of each hard prompt at the exploration temperature, joined to the batch.

        Every process samples when any has a hard prompt (a sharded model generates in lock-step):
        one without samples its first prompt and discards it.
        """
        if self.replay is not None:  # rows are re-padded with the rollout's pad token
            self.replay.pad_token_id = params.pad_token_id
        if groups.temperature is None:  # each row is scored (and replayed) at its own temperature
            groups.temperature = torch.full_like(groups.rewards, params.temperature)
        g = group_size
        hard = hard_prompts(groups.rewards, groups.correct, g, self.hard_rule)
        index = hard.nonzero().flatten().tolist()
        stats["uec/hard_prompts"] = len(index) / len(hard)
        if not any_rank(bool(index)):
            return groups
        explore = replace(
            params,
            temperature=self.exploration_temperature,
            num_samples=self.exploration_samples or params.num_samples,
        )
        pick = index or [0]
        expanded = sample(
            [groups.questions[i * g] for i in pick], [groups.answers[i * g] for i in pick], explore
        )
        if not index:
            return groups
        expanded.temperature = torch.full_like(expanded.rewards, explore.temperature)
        stats["uec/expanded_success"] = float(expanded.correct.float().mean())
        ids = expanded_groups(hard, g, explore.num_samples, self.advantage_group)
        return append_rows(groups, expanded, ids, g, params.pad_token_id)

    def exclude(self, groups: Groups, advantages: Tensor) -> Tensor | None:
        """UEC-RL's keep rules, only in a batch this process extended (else the batch is GRPO's)."""
        if groups.added is None or not bool(groups.added.any()):
            return None
        added = groups.added
        keep, keep_expanded = select_exploration_samples(
            advantages[~added],
            advantages[added],
            regular_keep=self.regular_keep,
            expanded_keep=self.expanded_keep,
        )
        excluded = torch.zeros_like(added)
        excluded[~added] = ~keep
        excluded[added] = ~keep_expanded
        return excluded

    def after_update(self, experience: Experience, train: Train, rl_iteration: int) -> Metrics:
        """The stabiliser: the iteration's experience joins the buffer; every `replay_every`
        iterations one more optimizer step on a batch of it."""
        if self.replay is None:
            return {}
        self.replay.add(experience, temperature=experience.temperature, iteration=rl_iteration)
        metrics: Metrics = {}
        batch = self.replay_batch(rl_iteration, experience.input_ids.device)
        if batch is not None:
            metrics = {f"replay/{k}": v for k, v in train(batch).items()}
        return {**metrics, **self.replay.metrics(rl_iteration)}

    def replay_batch(self, rl_iteration: int, device: torch.device) -> Experience | None:
        """This iteration's replay batch (rows at their sampling temperatures), or None.

        Drawn with a generator seeded by the RL iteration, so a resumed run replays the same rows;
        every process joins the decision (a replay step is an optimizer step all ranks take).
        """
        size = self.replay_batch_size
        ready = len(self.replay) >= (size or 1)
        if not (self.replay_due(rl_iteration) and all_ranks_agree(ready)):
            return None
        index = (
            None
            if size is None
            else self.replay.sample_index(size, torch.Generator().manual_seed(rl_iteration))
        )
        batch = self.replay.batch(device=device, index=index)
        batch.temperature = self.replay.row_temperatures(index=index).to(device)
        return batch

    def state_dict(self) -> dict:
        """The replay buffer of every process (a collective), in rank order."""
        return {"replay": None if self.replay is None else gather_objects(self.replay.state_dict())}

    def load_state_dict(self, state: dict) -> None:
        if self.replay is not None and state.get("replay") is not None:
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
            self.replay.load_state_dict(state["replay"][rank])


# ---------------------------------------------------------------------------------- the rules
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


def expanded_groups(
    hard: Tensor, group_size: int, expanded_group_size: int, advantage_group: AdvantageGroup
) -> Tensor:
    """``[H * G']`` long: the advantage group of each expanded row (hard prompts in order).

    ``"joint"``: a hard prompt's G regular and G' expanded samples form one group of G + G' (an
    expanded success then pushes the failed regular samples down), so an expanded row takes its
    prompt's index; ``"separate"``: the expanded samples of a prompt form a group of their own,
    numbered after the regular ones. Regular rows keep ``row // group_size`` either way.
    """
    if advantage_group not in ("joint", "separate"):
        raise ValueError(f"advantage_group must be 'joint' or 'separate', got {advantage_group!r}")
    index = hard.nonzero().flatten()
    if advantage_group == "separate":
        index = hard.numel() + torch.arange(len(index), device=hard.device)
    return index.repeat_interleave(expanded_group_size)


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
