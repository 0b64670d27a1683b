"""LightningDataModule for hybrid SFT + RL: expert demonstrations, RL prompts, eval sets.

It yields text, never token ids: the LightningModule owns the tokenizer and the prompt
format. Each phase (SFT warm-up, RL) is one training epoch, one `IterationBatch` per iteration
(`egspo.data.batches`): its number and phase, the RL prompts and gold answers of this rank, and
the demonstrations of this rank.

Batch ``i`` is a pure function of (seed, i, rank, world_size); a resumed run continues with
exactly the batches it would have seen (`PhaseBatches` is resumable). Eval sets are the
validation loaders, one per set, run by Lightning after each phase.

When the data loads, the gold answers of the RL prompts and of every eval set are audited once
(`egspo.rewards.audit_golds`): golds the reward can never pay (unparsable) or pays only for their
own text (lossy) are counted and shown, and, as the `gold_audit` option says, kept, dropped or
refused. A prompt whose gold cannot be verified teaches nothing and scores every eval answer 0.
"""

from __future__ import annotations

from typing import Literal

import lightning as L
import torch
from torch.utils.data import DataLoader

from egspo.data.batches import (
    EpochSampler,
    EvalShard,
    InOrder,
    IterationBatch,
    IterationDataset,
    PhaseBatches,
    collate_eval,
)
from egspo.data.gold_audit import report_audit, run_audits
from egspo.data.records import DataError, DataSource, Example
from egspo.data.synthetic import SyntheticArithmetic
from egspo.rewards import GoldAudit

GoldAuditMode = Literal["report", "drop", "fail"]
PROMPT_SET = "prompts"  # the RL prompts' name in the audit's metrics, `data/prompts/...`


def data_option_problems(
    *,
    expert: object,
    prompts: object,
    synthetic: object,
    sft_iterations: int,
    rl_iterations: int,
    prompts_per_step: int,
    expert_per_step: int,
    eval_size: int | None,
    eval_batch_size: int,
    sft_mixing: bool = False,
) -> list[str]:
    """What is wrong with the data options for phases of these lengths, one line each naming the
    option; the CLI runs it on the parsed config before anything loads.

    A phase with nothing to draw from would fail only when it starts (an SFT warm-up with
    `expert_per_step=0` after the model loads, an RL phase with `prompts_per_step=0` after the
    whole warm-up), so each phase's own draw must be >= 1; `sft_mixing`: RL mixes SFT
    (`model.mu` > 0), which draws demonstrations too.

    Long: one flat list of independent checks, each a condition and its message.
    """
    problems = []
    no_data = synthetic is None and expert is None and prompts is None
    if synthetic is not None and (expert is not None or prompts is not None):
        problems.append(
            "data.synthetic: give either the synthetic task or data.expert/data.prompts, not both"
        )
    if no_data:
        problems.append("no training data: give data.expert and/or data.prompts, or data.synthetic")
    for option, value in (("prompts_per_step", prompts_per_step), ("expert_per_step", expert_per_step)):
        if value < 0:
            problems.append(f"data.{option}={value}: must be >= 0")
    if sft_iterations > 0 and expert_per_step == 0:
        problems.append(
            f"data.expert_per_step=0: the SFT warm-up (model.sft_iterations={sft_iterations}) trains on "
            "demonstrations; give >= 1, or set model.sft_iterations=0"
        )
    elif rl_iterations > 0 and sft_mixing and expert_per_step == 0:
        problems.append(
            "data.expert_per_step=0: model.mu mixes SFT into the RL phase, which needs demonstrations; "
            "give >= 1, or set model.mu=0"
        )
    if expert_per_step > 0 and not no_data and synthetic is None and expert is None:
        problems.append(
            f"data.expert_per_step={expert_per_step}: no demonstrations to draw from; give data.expert, "
            "or set data.expert_per_step=0"
        )
    if rl_iterations > 0 and prompts_per_step == 0:
        problems.append(
            f"data.prompts_per_step=0: the RL phase (model.rl_iterations={rl_iterations}) samples answers to "
            "prompts; give >= 1, or set model.rl_iterations=0"
        )
    if prompts_per_step > 0 and not no_data and synthetic is None and prompts is None:
        problems.append(
            f"data.prompts_per_step={prompts_per_step}: no RL prompts to draw from; give data.prompts, "
            "or set data.prompts_per_step=0"
        )
    if eval_size is not None and eval_size < 1:
        problems.append(f"data.eval_size={eval_size}: must be >= 1 (or null: the whole of each eval set)")
    if eval_batch_size < 1:
        problems.append(f"data.eval_batch_size={eval_batch_size}: must be >= 1")
    return problems


class HybridDataModule(L.LightningDataModule):
    """Expert demonstrations, RL prompts and eval sets for hybrid SFT + RL training.

    Args:
        expert: demonstrations (records need a response) for SFT and SFT mixing.
        prompts: questions with gold answers for RL rollouts.
        eval_sets: named evaluation sets, one validation dataloader each.
        synthetic: generate the arithmetic task instead; its train split gives both expert
            and prompts, its test split the eval set ``"synthetic"`` (with any ``eval_sets``).
        sft_iterations, rl_iterations: the length of each phase (set from the model by the CLI).
        prompts_per_step: RL prompts per iteration and process.
        expert_per_step: expert demonstrations per iteration and process.
        eval_size: keep the first ``eval_size`` records of each eval set.
        eval_batch_size: prompts per validation batch.
        seed: seeds the sampling order (independent of the global seed).
        gold_audit: what to do with RL prompts and eval records whose gold answer the reward
            cannot verify in full (unparsable: never paid; lossy: paid only for its own text),
            found when the data loads. Every mode counts them and shows examples (log, and
            ``data/<set>/unparsable_golds``, ``data/<set>/lossy_golds`` and a text summary in
            the trainer's logger); "drop" also leaves them out (``data/<set>/dropped_prompts``),
            "fail" stops the run naming the set and the first such gold.

    Rank and world size come from the attached trainer, or from ``rank``/``world_size``
    attributes when used without one.
    """

    def __init__(
        self,
        expert: DataSource | None = None,
        prompts: DataSource | None = None,
        eval_sets: dict[str, DataSource] | None = None,
        synthetic: SyntheticArithmetic | None = None,
        sft_iterations: int = 0,
        rl_iterations: int = 100,
        prompts_per_step: int = 8,
        expert_per_step: int = 8,
        eval_size: int | None = None,
        eval_batch_size: int = 64,
        seed: int = 0,
        gold_audit: GoldAuditMode = "report",
    ) -> None:
        super().__init__()
        if sft_iterations < 0 or rl_iterations < 0 or sft_iterations + rl_iterations < 1:
            raise ValueError("sft_iterations and rl_iterations must be >= 0, and not both 0")
        problems = data_option_problems(
            expert=expert,
            prompts=prompts,
            synthetic=synthetic,
            sft_iterations=sft_iterations,
            rl_iterations=rl_iterations,
            prompts_per_step=prompts_per_step,
            expert_per_step=expert_per_step,
            eval_size=eval_size,
            eval_batch_size=eval_batch_size,
        )
        if problems:
            raise ValueError("; ".join(problems))
        self.expert_source, self.prompt_source = expert, prompts
        self.eval_sources = dict(eval_sets or {})
        if synthetic is not None and "synthetic" in self.eval_sources:
            raise ValueError("eval set name 'synthetic' is taken by the synthetic task")
        if PROMPT_SET in self.eval_sources:
            raise ValueError(
                f"data.eval_sets.{PROMPT_SET}: the name is taken by the RL prompts' data/{PROMPT_SET}/* metrics"
            )
        self.synthetic = synthetic
        self.sft_iterations, self.rl_iterations = sft_iterations, rl_iterations
        self.prompts_per_step, self.expert_per_step = prompts_per_step, expert_per_step
        self.eval_size, self.eval_batch_size, self.seed = eval_size, eval_batch_size, seed
        self.gold_audit = gold_audit
        self.gold_audits: dict[str, GoldAudit] = {}
        self._train_batches: PhaseBatches | None = None
        self._teachers: dict[str, list[str]] | None = None
        self.rank: int | None = None
        self.world_size: int | None = None
        self.expert_examples: list[Example] = []
        self.prompt_examples: list[Example] = []
        self.eval_examples: dict[str, list[Example]] = {}
        self._loaded = False

    @property
    def phases(self) -> list[tuple[str, int, int]]:
        """``(phase, first iteration, end)`` of each non-empty phase, in order: one epoch each."""
        total = self.sft_iterations + self.rl_iterations
        bounds = [("sft", 0, self.sft_iterations), ("rl", self.sft_iterations, total)]
        return [(name, start, stop) for name, start, stop in bounds if stop > start]

    @property
    def eval_set_names(self) -> list[str]:
        """Names of the validation dataloaders, in dataloader order."""
        names = ["synthetic"] if self.synthetic is not None else []
        return names + list(self.eval_sources)

    def setup(self, stage: str | None = None) -> None:
        if self._loaded:
            return
        if self.synthetic is not None:
            train = self.synthetic.generate(split="train")
            self.expert_examples, self.prompt_examples = train, train
            test = self.synthetic.generate(split="test")
            self.eval_examples["synthetic"] = test[: self.eval_size] if self.eval_size is not None else test
        else:
            self.expert_examples = self.expert_source.load() if self.expert_source else []
            self.prompt_examples = self.prompt_source.load() if self.prompt_source else []
        for name, source in self.eval_sources.items():
            examples = source.load()
            self.eval_examples[name] = examples[: self.eval_size] if self.eval_size is not None else examples
        self._audit_golds()
        missing = [i for i, e in enumerate(self.expert_examples) if not e.response]
        if self.expert_per_step and missing:
            raise DataError(
                f"expert data: {len(missing)} records without a response (first: record {missing[0] + 1})"
            )
        if self.expert_per_step and not self.expert_examples:
            raise DataError("expert_per_step > 0 but no expert data was given")
        if self.prompts_per_step and not self.prompt_examples:
            raise DataError("prompts_per_step > 0 but no prompt data was given")
        self._loaded = True

    def _audit_golds(self) -> None:
        """Audit the golds of the RL prompts and every eval set, then report, drop or fail.

        Rank zero parses the golds (with the module's reward when it is a math reward, so its
        cache is warm for training) and hands the result to every rank: dropping must leave all
        ranks the same prompts even if a verification timed out on one of them.
        """
        sets = {PROMPT_SET: self.prompt_examples, **self.eval_examples}
        module = self.trainer.lightning_module if self.trainer is not None else None
        reward = getattr(module, "reward", None)  # its cache is then warm for training
        sets = {name: examples for name, examples in sets.items() if examples}
        if self.trainer is None:
            audits = run_audits(sets, reward)
        else:
            audits = run_audits(sets, reward) if self.trainer.is_global_zero else None
            audits = self.trainer.strategy.broadcast(audits, src=0)
        self.gold_audits = audits
        for name, audit in audits.items():
            bad = [i for i, ok in enumerate(audit.ok) if not ok]
            if bad and self.gold_audit == "fail":
                first = bad[0]
                raise DataError(
                    f"data.gold_audit=fail: {self._describe(name)} record {first + 1}: answer "
                    f"{sets[name][first].answer!r} is {audit.flags[first]} ({audit.reasons[first]}); "
                    f"{audit.unparsable} unparsable and {audit.lossy} lossy of {len(audit.flags)} golds"
                )
            if bad and self.gold_audit == "drop":
                kept = [e for e, ok in zip(sets[name], audit.ok, strict=True) if ok]
                if not kept:
                    raise DataError(
                        f"data.gold_audit=drop: {self._describe(name)}: none of its {len(bad)} golds can be "
                        "verified in full, nothing is left"
                    )
                if name == PROMPT_SET:
                    self.prompt_examples = kept
                else:
                    self.eval_examples[name] = kept
            dropped = len(bad) if self.gold_audit == "drop" else None
            report_audit(self.trainer, name, f"{self._describe(name)}: {audit.summary()}", audit, dropped)

    def _describe(self, name: str) -> str:
        """The option and file of a set, for messages: `data.prompts (/data/train.jsonl)`."""
        if self.synthetic is not None and name in (PROMPT_SET, "synthetic"):
            return f"data.synthetic ({'train' if name == PROMPT_SET else 'test'} split)"
        source = self.prompt_source if name == PROMPT_SET else self.eval_sources[name]
        option = "data.prompts" if name == PROMPT_SET else f"data.eval_sets.{name}"
        split = f"[{source.split}]" if source.split else ""
        return f"{option} ({source.path}{split})"

    def _rank_and_world(self) -> tuple[int, int]:
        if self.rank is not None:
            return self.rank, self.world_size or 1
        if self.trainer is not None:
            return self.trainer.global_rank, self.trainer.world_size
        return 0, 1

    def train_dataset(self) -> IterationDataset:
        """The per-iteration batches of this process (rank)."""
        self.setup("fit")
        rank, world_size = self._rank_and_world()
        return IterationDataset(
            self.prompt_examples,
            self.expert_examples,
            num_iterations=self.sft_iterations + self.rl_iterations,
            prompts_per_step=self.prompts_per_step,
            expert_per_step=self.expert_per_step,
            seed=self.seed,
            rank=rank,
            world_size=world_size,
        )

    @property
    def teacher_responses(self) -> dict[str, list[str]]:
        """Each question's expert responses (the offline trajectories of an exploration bonus);
        several records of one question are its several teachers."""
        if self._teachers is None:
            self._teachers = {}
            for e in self.expert_examples:
                if e.response:
                    self._teachers.setdefault(e.prompt, []).append(e.response)
        return self._teachers

    def refill_prompts(self, iteration: int, round: int) -> tuple[list[str], list[str]]:
        """Further RL prompts of `iteration` for sampling round `round` >= 1 (dynamic sampling).

        Each round is its own seeded stream, sharded over ranks like the main batch, so the
        prompts are a pure function of (seed, iteration, round, rank) and a resumed run draws
        the same ones.
        """
        rank, world_size = self._rank_and_world()
        sampler = EpochSampler(
            len(self.prompt_examples), self.prompts_per_step, world_size, self.seed, f"refill/{round}"
        )
        examples = [self.prompt_examples[i] for i in sampler.indices(iteration, rank)]
        return [e.prompt for e in examples], [e.answer for e in examples]

    def train_dataloader(self) -> PhaseBatches:
        """The batches of the phase of the current epoch (the trainer reloads it every epoch)."""
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        if epoch >= len(self.phases):
            raise ValueError(f"epoch {epoch}: the run has {len(self.phases)} phases (one epoch each)")
        phase, start, stop = self.phases[epoch]
        self._train_batches = PhaseBatches(self.train_dataset(), phase, start, stop)
        return self._train_batches

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        """Marks a training batch consumed as it reaches the training step (see `PhaseBatches`)."""
        if isinstance(batch, IterationBatch) and self._train_batches is not None:
            self._train_batches.consumed(batch.iteration)
        return batch

    def val_dataloader(self) -> list[DataLoader]:
        self.setup("validate")
        rank, world_size = self._rank_and_world()
        shards = [EvalShard(self.eval_examples[name], rank, world_size) for name in self.eval_set_names]
        return [
            DataLoader(
                shard,
                batch_size=self.eval_batch_size,
                sampler=InOrder(shard),
                num_workers=0,
                collate_fn=collate_eval,
                generator=torch.Generator(),  # iterating draws no number from the global RNG
            )
            for shard in shards
        ]

    def test_dataloader(self) -> list[DataLoader]:
        return self.val_dataloader()
