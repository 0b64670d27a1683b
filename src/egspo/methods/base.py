"""The extension points of an RL iteration, for methods that change what is sampled, how it is
rewarded, or what the update trains on (UEC-RL, OGER). Configured in YAML as a list:

    model:
      methods:
        - class_path: egspo.methods.UECRL
          init_args: {exploration_temperature: 1.2}

One RL iteration calls the hooks of every method, in list order, at these points:

1. ``extend(groups, sample)``, after sampling (and after DAPO's dynamic sampling, a built-in that
   changes which prompts the batch keeps): add rows to the batch, returned as new ``Groups``
   (rows appended, each with its sampling temperature, its advantage group and ``added=True``).
   UEC-RL samples its hard prompts again, hotter.
2. ``shape_rewards(groups, entropy, context)``, on every row (regular and added alike): a term added
   to the verifiable reward before advantages, with its metrics. OGER pays its exploration bonus
   here; DAPO's soft overlong punishment is applied by the builder after every method's term.
3. ``exclude(groups, advantages)``: rows to leave out of the loss, once advantages are known
   (UEC-RL keeps regular rows with A != 0 and added rows with A >= 0). The builder's own filters
   (dynamic sampling's top-ups, overlong filtering) apply to every row too.
4. ``after_update(experience, train, rl_iteration)``, after the iteration's optimizer steps: more
   optimizer steps through ``train(batch) -> metrics`` (UEC-RL's replay update), or bookkeeping.
5. ``state_dict()`` / ``load_state_dict(state)``: what a resumed run needs, per process.

A method declares what it needs from the rest of the iteration with class attributes:
``needs_behaviour_logprobs`` (score old log-probs even for a single optimizer step, e.g. to store
them), ``adds_rows`` and ``needs_fixed_groups`` (a method whose hooks assume ``num_generations``
consecutive rows per group refuses to run beside one that adds rows, in one line before any
model loads).

A rollout engine is not a method: it only turns prompts into samples, behind
``egspo.rollout.RolloutEngine``. An engine that keeps its own copy of the weights (vLLM) is told
of optimizer steps by the rollout callback and syncs before it samples; an engine whose
log-probs are not the trainer's makes the builder score old log-probs and correct the mismatch.
Neither needs a hook here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from egspo.rollout.engine import SamplingParams
from egspo.rollout.experience import Experience
from egspo.rollout.groups import Groups

Metrics = dict[str, float]
# Sample `questions` again with other sampling params: (questions, answers, params) -> rewarded groups.
Sampler = Callable[[list[str], list[str], SamplingParams], Groups]
# One more update on a batch of experience with the iteration's gate threshold and schedule.
Train = Callable[[Experience], Metrics]


@dataclass
class RolloutContext:
    """What the reward-shaping hook may read besides the samples themselves."""

    policy: torch.nn.Module
    tokenizer: Any
    rl_iteration: int  # RL iterations completed before this one
    group_size: int  # num_generations
    teachers: Mapping[str, Sequence[str]] = field(default_factory=dict)  # question -> expert responses


class RLMethod:
    """Base of the RL-iteration plug-ins: every hook does nothing until a method overrides it."""

    needs_behaviour_logprobs: ClassVar[bool] = False
    adds_rows: ClassVar[bool] = False
    needs_fixed_groups: ClassVar[bool] = False

    def check(self, *, dynamic_sampling: bool) -> list[str]:
        """One line per option this method cannot run with (checked when the builder is made)."""
        return []

    def extend(
        self, groups: Groups, sample: Sampler, stats: Metrics, *, params: SamplingParams, group_size: int
    ) -> Groups:
        """`groups` with more rows (`egspo.rollout.groups.append_rows`), sampled with `sample` and
        `params` (the rollout's, to vary); `stats` takes this method's metrics."""
        return groups

    def shape_rewards(
        self, groups: Groups, entropy: Tensor, context: RolloutContext
    ) -> tuple[Tensor | None, Metrics]:
        """A term ``[N]`` added to every row's reward (None: nothing), and its metrics."""
        return None, {}

    def exclude(self, groups: Groups, advantages: Tensor) -> Tensor | None:
        """``[N]`` bool: rows to leave out of the loss (None: none)."""
        return None

    def after_update(self, experience: Experience, train: Train, rl_iteration: int) -> Metrics:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state, but the checkpoint holds some for it")


def check_methods(methods: Sequence[RLMethod], *, dynamic_sampling: bool) -> list[str]:
    """Every problem of this list of methods, one line each (empty: they can run together)."""
    problems = [p for m in methods for p in m.check(dynamic_sampling=dynamic_sampling)]
    adders = [type(m).__name__ for m in methods if m.adds_rows]
    fixed = [type(m).__name__ for m in methods if m.needs_fixed_groups]
    if adders and (fixed or len(adders) > 1):
        names = sorted(set(adders + fixed))
        problems.append(
            f"model.methods: {', '.join(names)} cannot run together ({', '.join(adders)} adds rows to "
            "groups that the others expect to hold num_generations samples each)"
        )
    return problems
