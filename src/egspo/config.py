"""The module's typed groups of options, each a YAML block under `model:`.

Names follow TRL and verl where the concept exists there (`num_generations`,
`max_completion_length`, `ppo_epochs`, `ppo_max_token_len_per_gpu`). Each group validates
itself when built, so a bad value fails with one line naming the option before any model loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from egspo.losses.mismatch import MismatchCorrection, default_correction
from egspo.rollout.engine import RolloutEngine
from egspo.rollout.shared_prefill import SharedPrefillEngine


def _check(**problems: tuple[bool, str]) -> None:
    """Raise one ValueError listing every failed check, one line each: `option=value: why`."""
    failed = [f"{option}={message}" for option, (ok, message) in problems.items() if not ok]
    if failed:
        raise ValueError("\n".join(failed))


@dataclass
class PromptConfig:
    """How a question becomes the text before the response (chat template when the tokenizer has one).

    Args:
        system_prompt: an optional system turn.
        instruction: a line appended to every question (None: none).
        max_prompt_length: prompt tokens kept; longer prompts lose their beginning and are counted.
        max_sft_length: demonstration tokens kept (prompt + response + EOS); the prompt is first cut
            from the left to `max_prompt_length`, then the response from the right.
    """

    system_prompt: str | None = None
    instruction: str | None = None
    max_prompt_length: int = 512
    max_sft_length: int = 1024

    def __post_init__(self) -> None:
        _check(
            **{
                "model.prompt.max_prompt_length": (
                    self.max_prompt_length >= 1,
                    f"{self.max_prompt_length}: must be >= 1",
                ),
                "model.prompt.max_sft_length": (
                    self.max_sft_length >= 2,
                    f"{self.max_sft_length}: must be >= 2",
                ),
            }
        )


@dataclass
class RolloutConfig:
    """How RL experience is sampled and turned into advantages.

    Args:
        engine: the sampler, by `class_path` (`egspo.rollout.SharedPrefillEngine`,
            `HFGenerateEngine`, `ContinuousBatchingEngine`; default: `SharedPrefillEngine`).
        num_generations: samples per prompt, the group of the group-relative advantage.
        max_completion_length: new tokens per sample at most.
        temperature, top_p, top_k: the sampling distribution; log-probs and entropies are scored
            at the same temperature (`top_k=0` disables top-k).
        stop_token_ids: tokens that end a sample (default: the tokenizer's EOS and every
            `eos_token_id` of the model's generation_config).
        advantage_scale: "group" (GRPO), "batch", or "none" (Dr.GRPO).
        dynamic_sampling: DAPO's dynamic sampling: prompts whose samples all score alike (zero
            advantage) are replaced by fresh prompts, sampled in further rounds.
        max_num_gen_batches: sampling rounds per iteration at most with dynamic sampling (verl's
            name); when they run out, the batch is topped up with all-equal groups carrying no loss.
        mask_truncated_completions: overlong filtering (DAPO; TRL's name): samples that hit
            `max_completion_length` without a stop token carry no loss.
        overlong_buffer_len, overlong_penalty_factor: DAPO's soft overlong punishment (verl's
            names): the reward falls linearly by up to `overlong_penalty_factor` over the last
            `overlong_buffer_len` tokens before `max_completion_length` (None: off).
        mismatch_correction: how the loss corrects for an engine whose log-probs are not the
            trainer's (`egspo.losses.mismatch.MismatchCorrection`: truncated importance weights,
            sequence masking). None: on for such engines (`VLLMEngine`), metrics only otherwise.
    """

    engine: RolloutEngine | None = None
    num_generations: int = 8
    max_completion_length: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop_token_ids: list[int] | None = None
    advantage_scale: Literal["group", "batch", "none"] = "group"
    dynamic_sampling: bool = False
    max_num_gen_batches: int = 3
    mask_truncated_completions: bool = False
    overlong_buffer_len: int | None = None
    overlong_penalty_factor: float = 1.0
    mismatch_correction: MismatchCorrection | None = None

    def __post_init__(self) -> None:
        if self.engine is None:
            self.engine = SharedPrefillEngine()
        if self.mismatch_correction is None:
            self.mismatch_correction = default_correction(self.engine)
        buffer = self.overlong_buffer_len
        _check(
            **{
                "model.rollout.num_generations": (
                    self.num_generations >= 2,
                    f"{self.num_generations}: group-relative advantages need at least 2 samples per prompt",
                ),
                "model.rollout.max_completion_length": (
                    self.max_completion_length >= 1,
                    f"{self.max_completion_length}: must be >= 1",
                ),
                "model.rollout.temperature": (
                    self.temperature > 0,
                    f"{self.temperature}: must be > 0 (greedy decoding is for evaluation)",
                ),
                "model.rollout.top_p": (0 < self.top_p <= 1, f"{self.top_p}: must be in (0, 1]"),
                "model.rollout.top_k": (self.top_k >= 0, f"{self.top_k}: must be >= 0 (0 disables it)"),
                "model.rollout.max_num_gen_batches": (
                    self.max_num_gen_batches >= 1,
                    f"{self.max_num_gen_batches}: must be >= 1",
                ),
                "model.rollout.overlong_buffer_len": (
                    buffer is None or 1 <= buffer <= self.max_completion_length,
                    f"{buffer}: must be in [1, max_completion_length={self.max_completion_length}]",
                ),
                "model.rollout.overlong_penalty_factor": (
                    self.overlong_penalty_factor >= 0,
                    f"{self.overlong_penalty_factor}: must be >= 0",
                ),
            }
        )


@dataclass
class UpdateConfig:
    """Gradient steps: how experience and demonstrations are cut into optimizer steps.

    Args:
        ppo_epochs: passes over each rollout batch.
        mini_batch_size: sequences per optimizer step in RL, per process (default: the whole
            rollout batch, one step per iteration). Must divide the rollout batch; rows UEC-RL
            adds to it are spread over the mini-batches.
        sft_batch_size: demonstrations per optimizer step in the warm-up (default: all of the
            iteration's).
        ppo_max_token_len_per_gpu: token budget of one forward/backward (verl's name). Each
            mini-batch is packed into micro-batches of at most this many tokens whose gradients
            accumulate to exactly the mini-batch's; None: one pass per mini-batch. Set it on CPU
            too: a pass over many thousand tokens allocates activations of hundreds of MB each,
            and the page faults of every fresh allocation slow the update (at 4096 tokens an update
            of 19k tokens took 28.6 s instead of 54.0 s in one pass; BENCHMARKS.md section 7).
        rl_learning_rate: the learning rate of the RL phase (default: the optimizer's).
        max_grad_norm: gradient clipping (None: off).
        max_nonfinite_updates: stop after this many skipped (non-finite) updates in a row.
        logprob_chunk_size: rows per chunk of the fused log-prob/entropy op (default: ~256 MB of
            fp32 logits per chunk).
    """

    ppo_epochs: int = 1
    mini_batch_size: int | None = None
    sft_batch_size: int | None = None
    ppo_max_token_len_per_gpu: int | None = None
    rl_learning_rate: float | None = None
    max_grad_norm: float | None = 1.0
    max_nonfinite_updates: int = 5
    logprob_chunk_size: int | None = None

    def __post_init__(self) -> None:
        sizes = ("mini_batch_size", "sft_batch_size", "ppo_max_token_len_per_gpu", "logprob_chunk_size")
        lr, norm = self.rl_learning_rate, self.max_grad_norm
        _check(
            **{
                "model.update.ppo_epochs": (self.ppo_epochs >= 1, f"{self.ppo_epochs}: must be >= 1"),
                **{
                    f"model.update.{name}": (
                        getattr(self, name) is None or getattr(self, name) >= 1,
                        f"{getattr(self, name)}: must be >= 1",
                    )
                    for name in sizes
                },
                "model.update.rl_learning_rate": (lr is None or lr > 0, f"{lr}: must be > 0"),
                "model.update.max_grad_norm": (
                    norm is None or norm > 0,
                    f"{norm}: must be > 0 (null: no clipping)",
                ),
                "model.update.max_nonfinite_updates": (
                    self.max_nonfinite_updates >= 1,
                    f"{self.max_nonfinite_updates}: must be >= 1",
                ),
            }
        )


@dataclass
class EvalConfig:
    """Held-out evaluation (Lightning's validation loop: after each phase, and every
    `trainer.val_check_interval` iterations when that is an int).

    Args:
        max_completion_length: answer length on eval sets (default: the rollout's).
        num_samples: answers per prompt for pass@k, maj@k, length and truncation rate, sampled
            at the rollout temperature when > 1; the headline `accuracy` is always the greedy answer's.
        pass_k: the k of pass@k and maj@k (default: 1 and num_samples).
    """

    max_completion_length: int | None = None
    num_samples: int = 1
    pass_k: list[int] | None = None

    def __post_init__(self) -> None:
        length = self.max_completion_length
        _check(
            **{
                "model.evaluation.max_completion_length": (
                    length is None or length >= 1,
                    f"{length}: must be >= 1",
                ),
                "model.evaluation.num_samples": (self.num_samples >= 1, f"{self.num_samples}: must be >= 1"),
                "model.evaluation.pass_k": (
                    all(1 <= k <= self.num_samples for k in self.pass_k or []),
                    f"{self.pass_k}: every k must be in [1, model.evaluation.num_samples={self.num_samples}]",
                ),
            }
        )
