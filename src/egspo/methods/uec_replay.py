"""UEC-RL's stabiliser buffer: recent high-advantage trajectories that a replay update trains on
every `replay_every` iterations, with importance ratios against the policy that sampled them.

Pure torch. `egspo.methods.UECRL.after_update` adds each iteration's experience and draws the
replay batches; its docstring holds the options and the formula card.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from egspo.rollout.experience import Experience

STATE_VERSION = 1


# ---------------------------------------------------------------------------------- the buffer
@dataclass
class _Trajectory:
    """One stored trajectory, unpadded, on the CPU."""

    prompt_ids: Tensor  # [p] the prompt's attended tokens
    completion_ids: Tensor  # [c] up to the last completion token
    completion_mask: Tensor  # [c] float32
    completion_attention: Tensor  # [c] the attention mask's completion part
    behaviour_logprobs: Tensor  # [c] float32, at the sampling temperature
    entropy: Tensor  # [c] float32, at the sampling temperature
    ref_logprobs: Tensor | None  # [c] float32, at the sampling temperature
    advantage: float
    reward: float
    correct: bool | None
    truncated: bool
    temperature: float  # at float32 precision
    iteration: int

    _TENSORS = (
        "prompt_ids",
        "completion_ids",
        "completion_mask",
        "completion_attention",
        "behaviour_logprobs",
        "entropy",
        "ref_logprobs",
    )
    _SCALARS = ("advantage", "reward", "correct", "truncated", "temperature", "iteration")

    def state(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self._TENSORS + self._SCALARS}


class ReplayBuffer:
    """UEC-RL's stabiliser: the latest ``capacity`` trajectories whose advantage exceeds ``min_advantage``.

    :meth:`add` takes an :class:`Experience` (or a selection of it) after its iteration's update
    and keeps, in row order, the rows with ``A > min_advantage`` that carry loss (not excluded,
    at least one completion token); the oldest rows leave first (FIFO). Each row keeps its token
    ids, masks, advantage, reward, its behaviour log-probs and entropies (scored at its sampling
    temperature), reference log-probs when the experience has them, its sampling temperature and
    the iteration it was drawn at. Rows are stored unpadded on the CPU.

    :meth:`batch` (every row, oldest first) and :meth:`sample` (a random subset, deterministic for a
    given generator, in buffer order; :meth:`sample_index` gives its positions) give an
    :class:`Experience` for
    :meth:`egspo.update.PolicyUpdate.rl_iteration`: prompts re-padded on the left with
    ``pad_token_id``, completions on the right, ``old_logprobs`` = the behaviour log-probs (so
    the update's ratio is the importance ratio against the behaviour policy), ``advantages`` = the
    stored ones. Rows drawn at different temperatures must be scored at their own: ask for one
    temperature at a time (:meth:`temperatures`), or take :meth:`row_temperatures` with the same
    arguments as the batch.

    :meth:`state_dict` holds plain tensors, numbers and lists (a checkpoint with it loads with
    ``torch.load(weights_only=True)``); :meth:`load_state_dict` restores it exactly, then keeps the
    latest ``capacity`` rows if this buffer is smaller (this run's options win for new rows).

    Args:
        capacity: s', trajectories kept at most (>= 1).
        min_advantage: A0; a row is kept when its advantage is strictly greater.
        pad_token_id: the id that pads the token rows of a batch.
    """

    def __init__(self, capacity: int = 128, min_advantage: float = 1.0, pad_token_id: int = 0) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if not math.isfinite(min_advantage):
            raise ValueError(f"min_advantage must be finite, got {min_advantage}")
        self.capacity = capacity
        self.min_advantage = min_advantage
        self.pad_token_id = pad_token_id
        self.rows: list[_Trajectory] = []
        self.added_total = 0

    def __len__(self) -> int:
        return len(self.rows)

    # ------------------------------------------------------------------ in
    @torch.no_grad()
    def add(
        self,
        experience: Experience,
        *,
        temperature: float | Tensor,
        iteration: int,
        behaviour_logprobs: Tensor | None = None,
    ) -> int:
        """Keep the qualifying rows of `experience`; the number kept.

        Args:
            experience: scored rollouts, e.g. the iteration's experience after its update.
            temperature: the sampling temperature, one for all rows or ``[N]`` per row.
            iteration: the RL iteration the rows were drawn at (for their age).
            behaviour_logprobs: ``[N, C]`` log-probs of the sampled tokens under the policy that
                drew them, at its temperature; default ``experience.old_logprobs``. One of the two
                is needed (the builder scores old log-probs when the update asks for them).
        Long: validation, then one vectorised copy to the CPU and one loop that stores each kept row unpadded.
        """
        behaviour = experience.old_logprobs if behaviour_logprobs is None else behaviour_logprobs
        if behaviour is None:
            raise ValueError(
                "the replay buffer needs behaviour log-probs: the experience has no old_logprobs "
                "(score them at rollout time, or pass behaviour_logprobs)"
            )
        n, width = experience.completion_mask.shape
        if behaviour.shape != (n, width):
            raise ValueError(f"behaviour log-probs must be [{n}, {width}], got {tuple(behaviour.shape)}")
        temperatures = torch.as_tensor(temperature).detach().flatten().cpu().to(torch.float32)
        if temperatures.numel() == 1:
            temperatures = temperatures.expand(n)
        if temperatures.shape != (n,) or not bool((temperatures > 0).all()):
            raise ValueError(f"temperature must be > 0, one value or one per row ({n}), got {temperature}")
        eligible = experience.advantages.float() > self.min_advantage
        eligible &= experience.loss_mask.sum(1) > 0
        index = eligible.nonzero().flatten()
        if index.numel() == 0:
            return 0
        p = experience.prompt_length
        cpu = {
            "ids": experience.input_ids[index].cpu(),
            "attention": experience.attention_mask[index].cpu(),
            "mask": experience.completion_mask[index].float().cpu(),
            "behaviour": behaviour[index].float().cpu(),
            "entropy": experience.entropy[index].float().cpu(),
            "ref": None if experience.ref_logprobs is None else experience.ref_logprobs[index].float().cpu(),
            "advantages": experience.advantages[index].float().cpu(),
            "rewards": experience.rewards[index].float().cpu(),
            "truncated": experience.truncated[index].cpu(),
            "correct": None if experience.correct is None else experience.correct[index].cpu(),
        }
        for j, row in enumerate(index.tolist()):
            used = int(cpu["mask"][j].nonzero().max()) + 1
            prompt_attention = cpu["attention"][j, :p].bool()
            self.rows.append(
                _Trajectory(
                    prompt_ids=cpu["ids"][j, :p][prompt_attention].clone(),
                    completion_ids=cpu["ids"][j, p : p + used].clone(),
                    completion_mask=cpu["mask"][j, :used].clone(),
                    completion_attention=cpu["attention"][j, p : p + used].clone(),
                    behaviour_logprobs=cpu["behaviour"][j, :used].clone(),
                    entropy=cpu["entropy"][j, :used].clone(),
                    ref_logprobs=None if cpu["ref"] is None else cpu["ref"][j, :used].clone(),
                    advantage=float(cpu["advantages"][j]),
                    reward=float(cpu["rewards"][j]),
                    correct=None if cpu["correct"] is None else bool(cpu["correct"][j]),
                    truncated=bool(cpu["truncated"][j]),
                    temperature=float(temperatures[row]),
                    iteration=int(iteration),
                )
            )
        self.added_total += len(index)
        self._evict()
        return len(index)

    def _evict(self) -> None:
        if len(self.rows) > self.capacity:
            del self.rows[: len(self.rows) - self.capacity]

    def clear(self) -> None:
        self.rows.clear()

    # ------------------------------------------------------------------ out
    def temperatures(self) -> list[float]:
        """The distinct sampling temperatures of the stored rows, ascending (float32 precision)."""
        return sorted({r.temperature for r in self.rows})

    def row_temperatures(self, temperature: float | None = None, index: Tensor | None = None) -> Tensor:
        """``[n]`` float32: the sampling temperature of each row of :meth:`batch` (same arguments)."""
        return torch.tensor([r.temperature for r in self._rows(temperature, index)], dtype=torch.float32)

    def batch(
        self,
        temperature: float | None = None,
        device: torch.device | str | None = None,
        index: Tensor | None = None,
    ) -> Experience | None:
        """The stored rows, oldest first, as one batch; None when there is none.

        ``temperature``: only the rows drawn at it; ``index``: only these positions (of the rows
        left by the temperature filter), e.g. from :meth:`sample_index`.
        """
        return _to_experience(self._rows(temperature, index), self.pad_token_id, device)

    def sample_index(
        self, size: int, generator: torch.Generator | None = None, temperature: float | None = None
    ) -> Tensor:
        """Positions of ``size`` rows drawn uniformly without replacement (all when fewer), ascending:
        pass them to :meth:`batch` and :meth:`row_temperatures` (with the same ``temperature``)."""
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        n = len(self._rows(temperature))
        if n <= size:
            return torch.arange(n)
        return torch.randperm(n, generator=generator)[:size].sort().values

    def sample(
        self,
        size: int,
        generator: torch.Generator | None = None,
        temperature: float | None = None,
        device: torch.device | str | None = None,
    ) -> Experience | None:
        """``batch(temperature, device, sample_index(size, generator, temperature))``."""
        return self.batch(temperature, device, self.sample_index(size, generator, temperature))

    def _rows(self, temperature: float | None, index: Tensor | None = None) -> list[_Trajectory]:
        rows = list(self.rows)
        if temperature is not None:
            wanted = _canonical_temperature(temperature)
            rows = [r for r in rows if r.temperature == wanted]
        if index is not None:
            rows = [rows[i] for i in index.tolist()]
        return rows

    def metrics(self, rl_iteration: int | None = None) -> dict[str, float]:
        """``replay/size``, ``replay/added_total`` and, when not empty, the mean advantage, sampling
        temperature and (given the current RL iteration) age in iterations of the stored rows."""
        out = {"replay/size": float(len(self.rows)), "replay/added_total": float(self.added_total)}
        if self.rows:
            out["replay/advantage_mean"] = sum(r.advantage for r in self.rows) / len(self.rows)
            out["replay/temperature_mean"] = sum(r.temperature for r in self.rows) / len(self.rows)
            if rl_iteration is not None:
                out["replay/age_mean"] = sum(rl_iteration - r.iteration for r in self.rows) / len(self.rows)
        return out

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict[str, Any]:
        """Plain tensors, numbers and lists: loads with ``torch.load(weights_only=True)``."""
        return {
            "version": STATE_VERSION,
            "capacity": self.capacity,
            "min_advantage": self.min_advantage,
            "pad_token_id": self.pad_token_id,
            "added_total": self.added_total,
            "rows": [r.state() for r in self.rows],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(
                f"replay buffer state version {state.get('version')!r}, expected {STATE_VERSION}"
            )
        self.rows = [_Trajectory(**row) for row in state["rows"]]
        self.added_total = int(state["added_total"])
        self._evict()


def _canonical_temperature(value: float) -> float:
    """A temperature at float32 precision (as the scoring op uses it): 1.2 given as a Python float
    and as a float32 tensor element are the same temperature."""
    return float(torch.tensor(value, dtype=torch.float32))


def _to_experience(
    rows: list[_Trajectory], pad_token_id: int, device: torch.device | str | None
) -> Experience | None:
    """Stored rows as one batch: prompts left-padded, completions right-padded to common widths."""
    if not rows:
        return None
    prompt_width = max(r.prompt_ids.numel() for r in rows)
    width = max(r.completion_ids.numel() for r in rows)

    def right(name: str, value: float) -> Tensor:
        return torch.stack(
            [F.pad(getattr(r, name), (0, width - getattr(r, name).numel()), value=value) for r in rows]
        )

    prompts = torch.stack(
        [F.pad(r.prompt_ids, (prompt_width - r.prompt_ids.numel(), 0), value=pad_token_id) for r in rows]
    )
    attention_dtype = rows[0].completion_attention.dtype
    prompt_attention = torch.stack(
        [
            F.pad(
                torch.ones(r.prompt_ids.numel(), dtype=attention_dtype),
                (prompt_width - r.prompt_ids.numel(), 0),
            )
            for r in rows
        ]
    )
    has_ref = all(r.ref_logprobs is not None for r in rows)
    has_correct = all(r.correct is not None for r in rows)
    experience = Experience(
        input_ids=torch.cat([prompts, right("completion_ids", pad_token_id)], dim=1),
        attention_mask=torch.cat([prompt_attention, right("completion_attention", 0)], dim=1),
        completion_mask=right("completion_mask", 0.0),
        entropy=right("entropy", 0.0),
        advantages=torch.tensor([r.advantage for r in rows], dtype=torch.float32),
        rewards=torch.tensor([r.reward for r in rows], dtype=torch.float32),
        truncated=torch.tensor([r.truncated for r in rows], dtype=torch.bool),
        prompt_length=prompt_width,
        old_logprobs=right("behaviour_logprobs", 0.0),
        ref_logprobs=right("ref_logprobs", 0.0) if has_ref else None,
        correct=torch.tensor([r.correct for r in rows], dtype=torch.bool) if has_correct else None,
    )
    if device is None:
        return experience
    moved = {f.name: getattr(experience, f.name) for f in fields(experience)}
    return replace(experience, **{k: v.to(device) for k, v in moved.items() if isinstance(v, Tensor)})
