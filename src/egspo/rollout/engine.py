"""Rollout engines: sample `num_generations` completions for every prompt in one batched call."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor
from transformers import GenerationConfig


@dataclass
class Rollout:
    """Prompts and sampled completions, one row per sample, grouped prompt by prompt.

    `input_ids = [prompt (left-padded) | completion (right-padded)]`; the completion starts at
    column `prompt_length`. `completion_mask` marks completion tokens up to and including EOS.
    """

    input_ids: Tensor  # [B*G, P + C]
    attention_mask: Tensor  # [B*G, P + C]
    completion_mask: Tensor  # [B*G, C]
    truncated: Tensor  # [B*G] bool: no EOS within max_completion_length
    prompt_length: int

    @property
    def completion_ids(self) -> Tensor:
        return self.input_ids[:, self.prompt_length :]


@runtime_checkable
class RolloutEngine(Protocol):
    """Anything that turns tokenised prompts into sampled completions (HF generate, vLLM, ...)."""

    def generate(
        self, model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor, num_generations: int
    ) -> Rollout: ...


class HFGenerateEngine:
    """Sampling with `transformers`' `generate`: one call for all prompts x samples, KV cache on.

    Args:
        max_completion_length: new tokens at most per sample.
        temperature, top_p, top_k: the sampling distribution (`top_k=0` disables it).
        eos_token_id, pad_token_id: filled in from the tokenizer by the trainer when None.
    """

    def __init__(
        self,
        max_completion_length: int = 256,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
    ) -> None:
        if max_completion_length < 1:
            raise ValueError(f"max_completion_length must be >= 1, got {max_completion_length}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0 for sampling, got {temperature}")
        self.max_completion_length = max_completion_length
        self.temperature = temperature
        self.top_p = top_p
        self.top_k = top_k
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id

    def _config(self, do_sample: bool, num_return_sequences: int) -> GenerationConfig:
        return GenerationConfig(
            do_sample=do_sample,
            max_new_tokens=self.max_completion_length,
            temperature=self.temperature if do_sample else None,
            top_p=self.top_p if do_sample else None,
            top_k=self.top_k if do_sample else None,
            num_return_sequences=num_return_sequences,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
            use_cache=True,
        )

    @torch.no_grad()
    def generate(
        self,
        model: torch.nn.Module,
        input_ids: Tensor,
        attention_mask: Tensor,
        num_generations: int,
        *,
        do_sample: bool = True,
    ) -> Rollout:
        was_training = model.training
        model.eval()
        try:
            sequences = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                generation_config=self._config(do_sample, num_generations),
            )
        finally:
            model.train(was_training)
        prompt_length = input_ids.shape[1]
        prompt_mask = attention_mask.repeat_interleave(num_generations, dim=0)
        completion_mask, truncated = completion_mask_from_eos(sequences[:, prompt_length:], self.eos_token_id)
        return Rollout(
            input_ids=sequences,
            attention_mask=torch.cat([prompt_mask, completion_mask], dim=1),
            completion_mask=completion_mask,
            truncated=truncated,
            prompt_length=prompt_length,
        )


def completion_mask_from_eos(completion_ids: Tensor, eos_token_id: int | list[int]) -> tuple[Tensor, Tensor]:
    """Mask of the tokens up to and including the first EOS, and whether no EOS was produced."""
    eos_ids = torch.as_tensor(eos_token_id, device=completion_ids.device).reshape(-1)
    is_eos = torch.isin(completion_ids, eos_ids)
    seen_before = is_eos.long().cumsum(dim=1) - is_eos.long()
    mask = (seen_before == 0).long()
    truncated = ~is_eos.any(dim=1)
    return mask, truncated
