"""`transformers`' continuous batching (`generate_batch`, paged attention) as a rollout engine, for GPUs.

Continuous batching schedules prompt and decode tokens of many requests into each forward pass,
shares the KV blocks of a prompt among its samples and frees a request's blocks as soon as it
ends, so no compute goes to padding or finished rows (TRL's `use_transformers_continuous_batching`).
It needs a flash-attention kernel to pay off: with `sdpa` or `eager` attention every forward pass
attends over the whole paged cache through a dense mask, which on CPU makes it many times slower
than `SharedPrefillEngine`. It is offered for GPU users; on CPU it is correct, only slow.

Exactness: the sampling processors come from the explicit generation config built here
(`generate_batch` uses the config it is given, and the model's own `generation_config` is hidden
for the call anyway): temperature, top-k, top-p, nothing else. `generate_batch` reports the
log-prob of each sampled token under the distribution it sampled from, i.e. after top-k / top-p;
that equals the tempered, untruncated log-prob the rollout promises only without truncation, so
`Rollout.logprobs` is filled then and left None otherwise. Entropies are not reported by
`generate_batch`: `Rollout.entropy` is None and the experience builder scores them.

Not for sharded (FSDP2) policies: `generate_batch` schedules forward passes by its own queue,
so ranks cannot be kept in lock-step; the engine refuses rather than hang.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence
from transformers import GenerationConfig
from transformers.generation import ContinuousBatchingConfig

from egspo.hf_names import unwrap_causal_lm
from egspo.rollout.engine import Rollout, SamplingParams, decodes_in_lockstep, eval_mode
from egspo.rollout.hf_generate import blank_generation_config

# What the engine itself decides; a user's `continuous_batching_config` may not override it.
_ENGINE_OWNED = ("return_logprobs",)


class ContinuousBatchingEngine:
    """Rollouts through `model.generate_batch` (continuous batching with a paged KV cache).

    Args:
        continuous_batching_config: keyword arguments of `transformers`'
            `ContinuousBatchingConfig` (e.g. `num_blocks`, `max_batch_tokens`, `page_size`,
            `auto_switch_to_flash`). `max_memory_percent` defaults to 0.5, as in TRL, so that
            the KV cache leaves GPU memory for the training step (`transformers`' own default,
            0.9, does not).

    Notes:
        The KV cache is sized from free accelerator memory unless `num_blocks` is given; on CPU
        give `num_blocks` and `max_batch_tokens` (the automatic sizing allocates for a large
        workload there). `generate_batch` may switch the model to a flash-attention kernel while
        it runs and restores the former implementation afterwards. It re-seeds the global torch
        RNG from a draw of that RNG, so a seeded run stays reproducible.
    """

    def __init__(self, continuous_batching_config: dict[str, Any] | None = None) -> None:
        options = dict(continuous_batching_config or {})
        owned = sorted(set(options) & set(_ENGINE_OWNED))
        if owned:
            raise ValueError(f"continuous_batching_config: {owned} are set by the engine, remove them")
        options.setdefault("max_memory_percent", 0.5)
        ContinuousBatchingConfig(**options)  # fails here, naming the bad option, rather than mid-training
        self.options = options

    @staticmethod
    def _generation_config(params: SamplingParams) -> GenerationConfig:
        sampling = {"temperature": params.temperature, "top_k": params.top_k, "top_p": params.top_p}
        return GenerationConfig(
            do_sample=not params.greedy,
            num_beams=1,
            max_new_tokens=params.max_new_tokens,
            num_return_sequences=params.num_samples,
            # -1: no stop token (`generate_batch` would otherwise fall back to the model config's EOS).
            eos_token_id=list(params.stop_token_ids) or -1,
            pad_token_id=params.pad_token_id,
            **({} if params.greedy else sampling),
        )

    @staticmethod
    def _records_logprobs(params: SamplingParams) -> bool:
        """Whether `generate_batch`'s log-probs are those of the tempered, untruncated distribution."""
        if params.greedy:
            return params.temperature == 1.0  # greedy decoding applies no temperature
        return not params.truncates

    @torch.no_grad()
    def generate(
        self, model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor, params: SamplingParams
    ) -> Rollout:
        if decodes_in_lockstep(model):
            raise ValueError(
                "ContinuousBatchingEngine cannot sample from an FSDP2-sharded policy (its forward passes "
                "are collectives the ranks would not call in step): use SharedPrefillEngine"
            )
        causal_lm = unwrap_causal_lm(model)  # peft's LoRA layers live inside it: adapters still apply
        # One list per prompt, padding removed: the request format of `generate_batch`.
        prompts = [row[keep].tolist() for row, keep in zip(input_ids, attention_mask.bool(), strict=True)]
        record = self._records_logprobs(params)
        cb_config = ContinuousBatchingConfig(**self.options, return_logprobs=record)
        with eval_mode(model), blank_generation_config(causal_lm):
            outputs = causal_lm.generate_batch(
                prompts,
                generation_config=self._generation_config(params),
                continuous_batching_config=cb_config,
                progress_bar=False,
            )
        rows = len(prompts) * params.num_samples
        results = list(outputs.values())  # grouped: each prompt's samples follow one another
        failed = {r.request_id: r.error for r in results if r.error is not None}
        if len(results) != rows or failed:
            raise RuntimeError(f"generate_batch returned {len(results)} of {rows} samples; failed: {failed}")
        device = input_ids.device
        completion_ids = pad_sequence(
            [torch.tensor(r.generated_tokens, dtype=torch.long) for r in results],
            batch_first=True,
            padding_value=params.pad_token_id,
        )
        logprobs = None
        if record:
            logprobs = pad_sequence(
                [torch.tensor(r.logprobs, dtype=torch.float32) for r in results], batch_first=True
            )
            logprobs = logprobs.to(device)
        return Rollout.from_completions(
            input_ids, attention_mask, completion_ids.to(device), params, logprobs=logprobs
        )
