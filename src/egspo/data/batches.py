"""The batches the data module serves: per-iteration training batches and sharded eval sets.

Training batch ``i`` is a pure function of (seed, i, rank, world_size), so a resumed run
continues with exactly the batches it would have seen; each eval set is split over the
processes in equal shards, padding flagged, so every example is counted once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch
from torch.utils.data import Dataset, DistributedSampler

from egspo.data.records import DataError, Example

if TYPE_CHECKING:
    from egspo.rollout.experience import Experience


@dataclass
class IterationBatch:
    """One training iteration's batch: the interface between the data, the rollout callback and the step.

    The data module fills the questions and demonstrations of this process; for an RL iteration,
    `egspo.callbacks.RolloutCallback` fills `experience` (and its `rollout_stats`) just before
    `training_step` runs, and the callbacks that look at rollouts read it from here afterwards.
    """

    iteration: int
    phase: Literal["sft", "rl"]
    prompts: list[str]
    answers: list[str]
    expert_prompts: list[str]
    expert_responses: list[str]
    experience: Experience | None = None
    rollout_stats: dict[str, float] = field(default_factory=dict)


def _stream_seed(seed: int, stream: str, epoch: int) -> int:
    digest = hashlib.blake2b(f"{seed}/{stream}/{epoch}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class EpochSampler:
    """Draws ``per_rank`` items per iteration and rank without replacement.

    Each epoch is a seeded permutation of the ``size`` items, cut into whole iterations of
    ``per_rank * world_size`` items (``size mod (per_rank * world_size)`` items of each
    epoch, different ones every epoch, are left out so no iteration straddles two epochs).
    Rank ``r`` takes slice ``r`` of its iteration's block, so ranks never share an item
    within an iteration.
    """

    def __init__(self, size: int, per_rank: int, world_size: int, seed: int, stream: str) -> None:
        self.size, self.per_rank, self.world_size = size, per_rank, world_size
        self.seed, self.stream = seed, stream
        self.per_iteration = per_rank * world_size
        if per_rank > 0 and self.per_iteration > size:
            raise DataError(
                f"{stream}: {size} records, fewer than {per_rank} per step x {world_size} "
                f"processes = {self.per_iteration} needed per iteration"
            )
        self.iterations_per_epoch = size // self.per_iteration if per_rank > 0 else 0
        self._cache: dict[int, torch.Tensor] = {}

    def indices(self, iteration: int, rank: int) -> list[int]:
        if self.per_rank == 0:
            return []
        epoch, step = divmod(iteration, self.iterations_per_epoch)
        perm = self._permutation(epoch)
        start = step * self.per_iteration + rank * self.per_rank
        return perm[start : start + self.per_rank].tolist()

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch not in self._cache:
            if len(self._cache) >= 4:
                self._cache.pop(next(iter(self._cache)))
            generator = torch.Generator().manual_seed(_stream_seed(self.seed, self.stream, epoch))
            self._cache[epoch] = torch.randperm(self.size, generator=generator)
        return self._cache[epoch]


class IterationDataset(Dataset):
    """Map-style dataset whose item ``i`` is the whole training batch of iteration ``i``."""

    def __init__(
        self,
        prompts: list[Example],
        expert: list[Example],
        *,
        num_iterations: int,
        prompts_per_step: int,
        expert_per_step: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.prompts, self.expert = prompts, expert
        self.num_iterations, self.rank = num_iterations, rank
        self.prompt_sampler = EpochSampler(len(prompts), prompts_per_step, world_size, seed, "prompts")
        self.expert_sampler = EpochSampler(len(expert), expert_per_step, world_size, seed, "expert")

    def __len__(self) -> int:
        return self.num_iterations

    def __getitem__(self, iteration: int) -> dict[str, list[str]]:
        if not 0 <= iteration < self.num_iterations:
            raise IndexError(iteration)
        prompts = [self.prompts[i] for i in self.prompt_sampler.indices(iteration, self.rank)]
        expert = [self.expert[i] for i in self.expert_sampler.indices(iteration, self.rank)]
        return {
            "prompts": [e.prompt for e in prompts],
            "answers": [e.answer for e in prompts],
            "expert_prompts": [e.prompt for e in expert],
            "expert_responses": [e.response for e in expert],
        }


class PhaseBatches:
    """The training batches of one phase, one per iteration, resumable where training left off.

    Iteration ``i``'s batch is the pure function ``dataset[i]`` plus its ``iteration`` and
    ``phase``. Its length is the whole phase's: a resumed fit restores Lightning's count of the
    batches done and stops when that count reaches the length. The state Lightning saves in a
    checkpoint is the next iteration *to train on*, advanced by `consumed` when a batch reaches
    the training step (Lightning fetches one batch ahead, so the iterator's own position would
    be one too far).
    """

    def __init__(self, dataset: IterationDataset, phase: str, start: int, stop: int) -> None:
        self.dataset, self.phase = dataset, phase
        self.start, self.stop = start, stop
        self.next_iteration = start

    def __len__(self) -> int:
        return self.stop - self.start

    def __iter__(self) -> Iterator[IterationBatch]:
        for iteration in range(max(self.next_iteration, self.start), self.stop):
            yield IterationBatch(iteration=iteration, phase=self.phase, **self.dataset[iteration])

    def consumed(self, iteration: int) -> None:
        self.next_iteration = iteration + 1

    def state_dict(self) -> dict[str, int]:
        return {"next_iteration": self.next_iteration}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.next_iteration = int(state["next_iteration"])


class EvalShard(Dataset):
    """This process's share of an eval set: items ``rank, rank + world, ...``, padded to an equal length.

    Every process then runs the same number of eval batches (sharded models generate in
    lock-step), and the padding items, copies of real ones flagged ``padding``, are left out of
    the metrics, so each example is counted exactly once.
    """

    def __init__(self, examples: list[Example], rank: int = 0, world_size: int = 1) -> None:
        self.examples = examples
        per_rank = -(-len(examples) // world_size)
        self.indices = [rank + world_size * i for i in range(per_rank)]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Example, bool]:
        index = self.indices[i]
        return self.examples[index % len(self.examples)], index >= len(self.examples)


class InOrder(DistributedSampler):
    """All of an `EvalShard`, in order. A DistributedSampler only so that Lightning does not
    replace it with its own, which would shard the already sharded set a second time."""

    def __init__(self, dataset: Dataset) -> None:
        super().__init__(dataset, num_replicas=1, rank=0, shuffle=False)

    def __iter__(self) -> Iterator[int]:
        return iter(range(len(self.dataset)))


def collate_eval(items: list[tuple[Example, bool]]) -> dict[str, list]:
    return {
        "prompts": [e.prompt for e, _ in items],
        "answers": [e.answer for e, _ in items],
        "padding": [p for _, p in items],
    }
