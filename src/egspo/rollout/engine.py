"""What every rollout engine takes and returns: sampling parameters, the rollout, the engine protocol.

An engine turns left-padded prompts into `num_samples` sampled completions per prompt, rows
grouped prompt by prompt. The loss later scores these tokens under `softmax(logits / T)`, so an
engine samples from exactly that distribution (then truncated by top-k / top-p, as asked) and
from nothing else: no repetition penalty, min-p or other processor a model's own
`generation_config` may carry. Engines that can also record, while sampling, each token's
log-prob and the entropy of the tempered distribution it came from, so that the rollout needs no
separate scoring pass for them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
import torch.distributed as dist
from torch import Tensor

from egspo.distributed import is_sharded


@dataclass(frozen=True)
class SamplingParams:
    """How to sample: one object for every engine, validated once.

    Args:
        max_new_tokens: completion tokens per sample at most.
        num_samples: samples per prompt (TRL's `num_generations`); rows come grouped prompt by prompt.
        temperature: the sampling distribution is `softmax(logits / temperature)`; > 0.
        top_p: nucleus truncation of the tempered distribution, in (0, 1]; 1 disables it.
        top_k: keep the k most likely tokens; 0 disables it.
        greedy: argmax decoding; temperature, top_p and top_k then do not change the choice
            (log-probs and entropies are still those of the tempered distribution).
        stop_token_ids: a row ends at the first of these, which is kept in its completion.
        pad_token_id: fills completion columns after a row's stop token.
    """

    max_new_tokens: int
    num_samples: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    greedy: bool = False
    stop_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0

    def __post_init__(self) -> None:
        # YAML and callers may hand a list; a tuple keeps the object hashable and immutable.
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        checks = {
            "max_new_tokens": (self.max_new_tokens >= 1, "must be >= 1"),
            "num_samples": (self.num_samples >= 1, "must be >= 1"),
            "temperature": (self.temperature > 0, "must be > 0"),
            "top_p": (0 < self.top_p <= 1, "must be in (0, 1]"),
            "top_k": (self.top_k >= 0, "must be >= 0 (0 disables it)"),
            "pad_token_id": (self.pad_token_id >= 0, "must be >= 0"),
            "stop_token_ids": (all(t >= 0 for t in self.stop_token_ids), "must be token ids >= 0"),
        }
        for name, (ok, message) in checks.items():
            if not ok:
                raise ValueError(f"SamplingParams.{name}: {message}, got {getattr(self, name)!r}")

    @property
    def truncates(self) -> bool:
        """Whether top-k or top-p cut the tempered distribution before sampling."""
        return self.top_k > 0 or self.top_p < 1.0


@dataclass
class Rollout:
    """Prompts and sampled completions, one row per sample, grouped prompt by prompt.

    `input_ids = [prompt (left-padded) | completion (right-padded)]`; the completion starts at
    column `prompt_length`. `completion_mask` marks completion tokens up to and including the stop
    token. `entropy` and `logprobs`, when the engine records them, are those of the tempered,
    untruncated distribution `softmax(logits / T)` each completion token was drawn from (nats;
    zero where `completion_mask` is 0): what the loss scores, whatever top-k / top-p did.
    """

    input_ids: Tensor  # [N, P + C]
    attention_mask: Tensor  # [N, P + C]
    completion_mask: Tensor  # [N, C] long
    truncated: Tensor  # [N] bool: no stop token within max_new_tokens
    prompt_length: int
    entropy: Tensor | None = None  # [N, C] float32
    logprobs: Tensor | None = None  # [N, C] float32

    @property
    def completion_ids(self) -> Tensor:
        return self.input_ids[:, self.prompt_length :]

    @classmethod
    def from_completions(
        cls,
        prompt_ids: Tensor,
        prompt_mask: Tensor,
        completion_ids: Tensor,
        params: SamplingParams,
        *,
        entropy: Tensor | None = None,
        logprobs: Tensor | None = None,
    ) -> Rollout:
        """Assemble a rollout from `[prompts, P]` and the `[prompts * num_samples, C]` completions.

        Every engine ends here, so masks, truncation flags and the zeros of recorded values past
        a row's stop token mean the same whatever engine produced the tokens.
        """
        g = params.num_samples
        completion_mask, truncated = completion_mask_from_eos(completion_ids, params.stop_token_ids)
        prompt_ids = prompt_ids.repeat_interleave(g, dim=0)
        prompt_mask = prompt_mask.repeat_interleave(g, dim=0)
        valid = completion_mask.bool()
        return cls(
            input_ids=torch.cat([prompt_ids, completion_ids.to(prompt_ids.dtype)], dim=1),
            attention_mask=torch.cat([prompt_mask, completion_mask.to(prompt_mask.dtype)], dim=1),
            completion_mask=completion_mask,
            truncated=truncated,
            prompt_length=prompt_ids.shape[1],
            entropy=None if entropy is None else entropy.float().masked_fill(~valid, 0.0),
            logprobs=None if logprobs is None else logprobs.float().masked_fill(~valid, 0.0),
        )


@runtime_checkable
class RolloutEngine(Protocol):
    """Anything that turns tokenised prompts into sampled completions (HF generate, vLLM, ...).

    Prompts arrive left-padded (`input_ids`, `attention_mask`: `[prompts, P]`); the rollout has
    `prompts * params.num_samples` rows, the samples of one prompt consecutive. Randomness comes
    from the global torch RNG (seeded by `seed_everything`). The model is in eval mode while it
    generates and back in its former mode afterwards.
    """

    def generate(
        self, model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor, params: SamplingParams
    ) -> Rollout: ...


def completion_mask_from_eos(
    completion_ids: Tensor, eos_token_id: int | Sequence[int]
) -> tuple[Tensor, Tensor]:
    """Mask of the tokens up to and including the first stop token, and whether none was produced."""
    eos_ids = torch.as_tensor(eos_token_id, dtype=completion_ids.dtype, device=completion_ids.device).reshape(
        -1
    )
    is_eos = torch.isin(completion_ids, eos_ids)
    seen_before = is_eos.long().cumsum(dim=1) - is_eos.long()
    mask = (seen_before == 0).long()
    truncated = ~is_eos.any(dim=1)
    return mask, truncated


def decodes_in_lockstep(model: torch.nn.Module) -> bool:
    """Whether every rank must run as many forward passes as the others while it samples.

    Under FSDP2 (`egspo.distributed.is_sharded`) each forward pass all-gathers the weights, a
    collective: a rank that stopped decoding early (its rows all finished) would leave the others
    waiting in their next forward pass forever. It must keep stepping until every rank is done.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return False
    return is_sharded(model)


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Dropout off while sampling (the loss scores the deterministic policy); the former mode after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
