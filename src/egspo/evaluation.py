"""Held-out evaluation: greedy accuracy and sampled-answer metrics, and the run's summary.json."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from egspo.metrics import EvalMetrics, resolve_pass_k
from egspo.rewards import RewardFunction
from egspo.rollout.builder import correctness
from egspo.rollout.engine import RolloutEngine, SamplingParams

if TYPE_CHECKING:
    from egspo.config import EvalConfig
    from egspo.data.encoding import PromptEncoder


class Evaluator:
    """Answers eval prompts with the policy and scores them with the reward.

    Per batch: the greedy answer of every prompt (the headline `accuracy`) and, when
    `num_samples > 1`, that many answers sampled at the rollout temperature under a private RNG
    seeded per batch, so evaluating mid-run neither changes the training rollouts nor depends
    on when it happens.
    """

    def __init__(
        self,
        encoder: PromptEncoder,
        reward: RewardFunction,
        config: EvalConfig,
        engine: RolloutEngine,
        rollout_params: Callable[[torch.nn.Module], SamplingParams],
    ) -> None:
        """`rollout_params(policy)` gives the training rollouts' sampling parameters
        (`ExperienceBuilder.sampling_params`): evaluation samples as they do, stop tokens included."""
        self.encoder = encoder
        self.reward = reward
        self.engine = engine
        self.rollout_params = rollout_params
        self.max_new_tokens = config.max_completion_length
        self.num_samples = config.num_samples
        self.pass_k = resolve_pass_k(config.num_samples, config.pass_k)
        self.running: dict[str, EvalMetrics] = {}

    def sampling(self, policy: torch.nn.Module) -> tuple[SamplingParams, SamplingParams]:
        """The greedy answer's and the sampled answers' parameters."""
        rollout = self.rollout_params(policy)
        length = self.max_new_tokens or rollout.max_new_tokens
        greedy = SamplingParams(
            greedy=True,
            max_new_tokens=length,
            stop_token_ids=rollout.stop_token_ids,
            pad_token_id=rollout.pad_token_id,
        )
        return greedy, replace(rollout, num_samples=self.num_samples, max_new_tokens=length)

    def evaluate_batch(self, policy: torch.nn.Module, eval_set: str, batch: dict, seed: int) -> None:
        """Answer one eval batch into the running metrics of `eval_set` (see `results`)."""
        device = next(policy.parameters()).device
        metrics = self.running.setdefault(eval_set, self.new_metrics(device))
        self.update(policy, batch["prompts"], batch["answers"], metrics, seed, batch.get("padding"))

    def results(self) -> dict[str, dict[str, float]]:
        """`{set: {metric: value}}` of the batches since the last call, reduced over processes."""
        running, self.running = self.running, {}
        return {name: {k: float(v) for k, v in m.compute().items()} for name, m in running.items()}

    def new_metrics(self, device: torch.device | str = "cpu") -> EvalMetrics:
        # Majority voting reads answers the way the reward does (its number fallback included).
        fallback = bool(getattr(self.reward, "number_fallback", False))
        return EvalMetrics(self.num_samples, self.pass_k, number_fallback=fallback).to(device)

    @torch.no_grad()
    def update(
        self,
        policy: torch.nn.Module,
        questions: list[str],
        answers: list[str],
        metrics: EvalMetrics,
        seed: int,
        padding: list[bool] | None = None,
    ) -> None:
        """Answer one batch and add its results to `metrics`, except the rows flagged `padding`
        (copies that even out the processes' shards: answered, so that sharded models generate
        in lock-step, but not counted)."""
        device = next(policy.parameters()).device
        prompts = self.encoder.prompts(questions, device)
        greedy, sampled = self.sampling(policy)
        texts, lengths, truncated = self._answer(policy, prompts, greedy)
        greedy_correct = correctness(self.reward(texts, answers)).to(device)
        n = self.num_samples
        samples = greedy_correct[:, None]
        if n > 1:
            with seeded_rng(device, seed):
                texts, lengths, truncated = self._answer(policy, prompts, sampled)
            repeated = [a for a in answers for _ in range(n)]
            samples = correctness(self.reward(texts, repeated)).to(device).view(-1, n)
        keep = [i for i in range(len(questions)) if not (padding and padding[i])]
        if not keep:
            return
        rows = torch.tensor(keep, device=device)
        metrics.update(
            greedy_correct=greedy_correct[rows],
            correct=samples[rows],
            completions=[texts[i * n : (i + 1) * n] for i in keep],
            lengths=lengths.view(-1, n)[rows],
            truncated=truncated.view(-1, n)[rows],
        )

    def _answer(self, policy, prompts, params: SamplingParams):
        rollout = self.engine.generate(policy, prompts.input_ids, prompts.attention_mask, params)
        texts = self.encoder.tokenizer.batch_decode(rollout.completion_ids, skip_special_tokens=True)
        return texts, rollout.completion_mask.sum(1), rollout.truncated


class RunSummary:
    """Held-out metrics at the end of each phase, written to `<run_dir>/summary.json`.

    `{"sft": {"accuracy": headline, "per_set": {set: acc}, "metrics": {set: {...}}}, "rl": ...}`;
    the headline is the mean greedy accuracy over eval sets.
    """

    def __init__(self) -> None:
        self.phases: dict[str, dict[str, dict[str, float]]] = {}

    def record(self, phase: str, results: dict[str, dict[str, float]]) -> None:
        self.phases[phase] = results

    def headline(self, phase: str) -> float:
        per_set = [values["accuracy"] for values in self.phases[phase].values()]
        return float(sum(per_set) / len(per_set)) if per_set else math.nan

    def to_dict(self) -> dict:
        return {
            phase: {
                "accuracy": self.headline(phase),
                "per_set": {name: values["accuracy"] for name, values in results.items()},
                "metrics": results,
            }
            for phase, results in self.phases.items()
        }

    def write(self, run_dir: Path, iterations: int) -> Path:
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / "summary.json"
        path.write_text(
            json.dumps({**self.to_dict(), "run_dir": str(run_dir), "iterations": iterations}, indent=2)
        )
        return path

    def table(self) -> str:
        rows = [f"{'checkpoint':<16}{'held-out accuracy':>20}"]
        for phase, label in (("sft", "warm-up (SFT)"), ("rl", "after RL")):
            if phase in self.phases:
                rows.append(f"{label:<16}{self.headline(phase):>20.3f}")
        return "\n".join(rows)

    def state_dict(self) -> dict:
        return {"phases": self.phases}

    def load_state_dict(self, state: dict) -> None:
        self.phases = dict(state.get("phases", {}))


@contextmanager
def seeded_rng(device: torch.device, seed: int | None = None) -> Iterator[None]:
    """Run the block on a fork of torch's RNG (seeded with `seed` if given); the state is restored after."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        if seed is not None:
            torch.manual_seed(seed)
        yield


def eval_seed(set_index: int, batch_index: int) -> int:
    """The private RNG seed of one eval batch: the same whatever the iteration or process count."""
    return 1_000_003 * set_index + batch_index
