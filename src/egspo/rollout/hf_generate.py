"""Sampling with `transformers`' `generate`, made to draw exactly from the distribution the loss scores.

`generate` fills every field of the generation config it is given that is left at None from the
model's own `generation_config` (a checkpoint's `generation_config.json`: repetition_penalty,
min_p, no_repeat_ngram_size, top_k=20, ...), then from library defaults (top_k=50). Several of
those fields are neutral only at None (min_p, sequence_bias, bad_words_ids, suppress_tokens, ...),
so no explicit config can switch them off. The engine therefore hides the model's
`generation_config` behind a blank one for the duration of the call, sets every length, stop and
sampling field itself, and builds the logits processors itself: temperature, then a recorder of
the tempered distribution's entropy and of the sampled token's log-prob, then top-k, then top-p
(`transformers`' own warpers, in `generate`'s order).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from egspo.hf_names import unwrap_causal_lm
from egspo.rollout.engine import Rollout, SamplingParams, decodes_in_lockstep, eval_mode


class TemperedStatsRecorder(LogitsProcessor):
    """Records, step by step, the entropy of `softmax(scores)` and the log-prob of the token then drawn.

    Placed right after the temperature warper, `scores` are the tempered, untruncated logits. The
    sampled token is only known at the next call (it is the last column of `input_ids`), so the
    log-softmax of the current step waits until then: one `[rows, V]` tensor is kept, never
    `[rows, T, V]`. `finish` gathers the last step's token.
    """

    def __init__(self) -> None:
        self.entropy: list[Tensor] = []
        self.logprobs: list[Tensor] = []
        self._pending: Tensor | None = None

    def _gather_pending(self, tokens: Tensor) -> None:
        if self._pending is not None:
            self.logprobs.append(self._pending.gather(1, tokens[:, None]).squeeze(1))
            self._pending = None

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        self._gather_pending(input_ids[:, -1])
        logp = torch.log_softmax(scores.float(), dim=-1)
        self.entropy.append(-(logp.exp() * logp.nan_to_num(neginf=0.0)).sum(-1))
        self._pending = logp
        return scores

    def finish(self, completion_ids: Tensor) -> tuple[Tensor, Tensor]:
        """`[rows, C]` entropies and sampled-token log-probs of the completions `generate` returned."""
        if completion_ids.shape[1]:
            self._gather_pending(completion_ids[:, -1])
        rows = completion_ids.shape[0]
        empty = completion_ids.new_zeros(rows, 0, dtype=torch.float32)
        entropy = torch.stack(self.entropy, dim=1) if self.entropy else empty
        logprobs = torch.stack(self.logprobs, dim=1) if self.logprobs else empty
        return entropy, logprobs


@contextmanager
def blank_generation_config(model: torch.nn.Module) -> Iterator[None]:
    """Hide `model.generation_config` so that `generate` inherits nothing from it; restore it after."""
    saved = model.generation_config
    model.generation_config = GenerationConfig()
    try:
        yield
    finally:
        model.generation_config = saved


class HFGenerateEngine:
    """`transformers.generate` for all prompts x samples in one call, KV cache on, recording as it samples.

    The reference engine: what `generate` does, with only the asked-for processors. It prefills
    each prompt once per sample, grows its KV cache by concatenation and keeps stepping finished
    rows (padding them) until the last row stops; `SharedPrefillEngine` avoids all three.

    Under FSDP2 the ranks decode in lock-step (`synced_gpus`): `generate` detects only sharding
    done by `transformers` itself, not egspo's `fully_shard`, so the engine says it.
    """

    def _config(self, params: SamplingParams) -> GenerationConfig:
        # The sampling processors are passed to `generate` (below); the config's are all neutral.
        sampling = {} if params.greedy else {"temperature": 1.0, "top_k": 0, "top_p": 1.0}
        return GenerationConfig(
            do_sample=not params.greedy,
            num_beams=1,
            max_new_tokens=params.max_new_tokens,
            min_new_tokens=0,
            num_return_sequences=params.num_samples,
            eos_token_id=list(params.stop_token_ids) or None,
            pad_token_id=params.pad_token_id,
            use_cache=True,
            return_dict_in_generate=False,
            **sampling,
        )

    @staticmethod
    def _processors(params: SamplingParams, recorder: TemperedStatsRecorder) -> LogitsProcessorList:
        processors = LogitsProcessorList()
        if params.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(params.temperature))
        processors.append(recorder)
        if not params.greedy:  # truncation never changes the argmax
            if params.top_k > 0:
                processors.append(TopKLogitsWarper(top_k=params.top_k))
            if params.top_p < 1.0:
                processors.append(TopPLogitsWarper(top_p=params.top_p))
        return processors

    @torch.no_grad()
    def generate(
        self, model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor, params: SamplingParams
    ) -> Rollout:
        causal_lm = unwrap_causal_lm(model)  # peft's LoRA layers live inside it: adapters still apply
        recorder = TemperedStatsRecorder()
        with eval_mode(model), blank_generation_config(causal_lm):
            sequences = causal_lm.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                generation_config=self._config(params),
                logits_processor=self._processors(params, recorder),
                synced_gpus=decodes_in_lockstep(model),
            )
        completion_ids = sequences[:, input_ids.shape[1] :]
        entropy, logprobs = recorder.finish(completion_ids)
        return Rollout.from_completions(
            input_ids, attention_mask, completion_ids, params, entropy=entropy, logprobs=logprobs
        )
