"""An engine that spends compute only on tokens that end up in a completion.

Two kinds of waste in `generate`-style batched sampling of G samples per prompt:

1. The prompt is prefilled G times (once per sample row), though all G forward passes are equal.
   Here each prompt is prefilled once and its KV cache is repeated to its G rows
   (`DynamicCache.batch_repeat_interleave`), with the last prompt position's logits.
2. A row that has produced its stop token keeps being stepped (and padded) until the slowest row
   of the batch stops. Here the batch is compacted as rows end: finished rows leave the KV cache
   (`DynamicCache.batch_select_indices`), the attention mask and the position ids, so each decode
   step costs what the still-running rows need. With completion lengths that vary, as they do
   once a policy has learned to stop, this is most of the work.

Sampling is exactly `generate`'s: the tempered distribution `softmax(logits / T)`, truncated by
`transformers`' own top-k and top-p warpers in `generate`'s order, one `torch.multinomial` over the
batch (argmax when greedy). Per-token entropy and sampled-token log-prob of the tempered,
untruncated distribution are recorded on the way; per step, only `[rows, V]` tensors exist.
All per-step work is batched tensor ops; the only host synchronisation is the one test per step
of whether a row has finished.
"""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import DynamicCache, LogitsProcessorList, TopKLogitsWarper, TopPLogitsWarper

from egspo.model import unwrap_causal_lm
from egspo.rollout.engine import Rollout, SamplingParams, eval_mode


def _truncation(params: SamplingParams) -> LogitsProcessorList:
    """Top-k then top-p, as `generate` orders them (its processors, so ties and edge cases match)."""
    warpers = LogitsProcessorList()
    if params.top_k > 0:
        warpers.append(TopKLogitsWarper(top_k=params.top_k))
    if params.top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=params.top_p))
    return warpers


def draw(
    logits: Tensor, params: SamplingParams, truncation: LogitsProcessorList
) -> tuple[Tensor, Tensor, Tensor]:
    """One token per row from `[rows, V]` fp32 logits, with its tempered log-prob and the entropy.

    The token comes from `softmax(logits / T)` cut by `truncation` (argmax when greedy); the
    log-prob and entropy are those of the uncut tempered distribution, what the loss scores.
    """
    scaled = logits / params.temperature if params.temperature != 1.0 else logits
    logp = torch.log_softmax(scaled, dim=-1)
    probs = logp.exp()
    if params.greedy:
        token = logits.argmax(dim=-1)
    elif truncation:
        # The warpers ignore their `input_ids` argument (it serves processors such as penalties).
        token = torch.multinomial(torch.softmax(truncation(None, scaled), dim=-1), 1).squeeze(1)
    else:
        token = torch.multinomial(probs, 1).squeeze(1)
    entropy = -(probs * logp.nan_to_num(neginf=0.0)).sum(-1)
    return token, logp.gather(1, token[:, None]).squeeze(1), entropy


class SharedPrefillEngine:
    """One prefill per prompt shared by its samples; finished rows dropped from the batch as they end.

    Works with any decoder-only `transformers` model whose cache is a `DynamicCache` (full or
    sliding-window attention), wrapped by peft or not (the LoRA layers live inside the causal LM
    that is called), with left-padded prompts (position ids follow the attention mask, as in
    `generate`).

    Args:
        compact_threshold: drop finished rows from the batch once at least this fraction of the
            running rows has finished (0: as soon as one has). Dropping copies the KV cache once,
            about what one decode step's attention reads; 0 is right on CPU, where every row's
            matmuls cost compute. On a GPU, where a decode step costs about the same for any
            number of rows up to hundreds, a higher value saves copies.
        sync_every: test for finished rows every this many steps. The test waits for the device
            (one host synchronisation); between tests, finished rows keep being stepped and their
            tokens are discarded. 1 costs nothing on CPU; on a GPU a larger value lets the host
            queue several steps ahead (a small model's decode step is bound by kernel launches).
    """

    def __init__(self, compact_threshold: float = 0.0, sync_every: int = 1) -> None:
        if not 0.0 <= compact_threshold < 1.0:
            raise ValueError(f"compact_threshold must be in [0, 1), got {compact_threshold}")
        if sync_every < 1:
            raise ValueError(f"sync_every must be >= 1, got {sync_every}")
        self.compact_threshold = compact_threshold
        self.sync_every = sync_every

    @torch.no_grad()
    def generate(
        self, model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor, params: SamplingParams
    ) -> Rollout:
        causal_lm = unwrap_causal_lm(model)  # peft's LoRA layers live inside it: adapters still apply
        with eval_mode(model):
            completion_ids, entropy, logprobs = self._sample(causal_lm, input_ids, attention_mask, params)
        return Rollout.from_completions(
            input_ids, attention_mask, completion_ids, params, entropy=entropy, logprobs=logprobs
        )

    def _sample(
        self, causal_lm: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor, params: SamplingParams
    ) -> tuple[Tensor, Tensor, Tensor]:
        """`[prompts * num_samples, C]` tokens, entropies and log-probs, C the longest completion."""
        device = input_ids.device
        g, steps = params.num_samples, params.max_new_tokens
        rows = input_ids.shape[0] * g
        truncation = _truncation(params)
        stop_ids = torch.tensor(params.stop_token_ids, dtype=torch.long, device=device)

        # Columns that are padding in every prompt carry nothing: they stay out of the prefill.
        mask = attention_mask.long()
        if not bool((mask[:, 1:] >= mask[:, :-1]).all()):
            raise ValueError("SharedPrefillEngine: prompts must be left-padded (padding after a token)")
        first = int(mask.any(dim=0).long().argmax())
        ids, mask = input_ids[:, first:], mask[:, first:]
        positions = (mask.cumsum(-1) - 1).clamp(min=0)

        cache = DynamicCache(config=causal_lm.config)
        out = causal_lm(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        logits = out.logits[:, -1].float().repeat_interleave(g, dim=0)
        del out
        cache.batch_repeat_interleave(g)
        next_position = positions[:, -1].repeat_interleave(g, dim=0) + 1
        # Without padding the causal mask is implied, and (as in `generate`) none is built per step.
        mask = mask.repeat_interleave(g, dim=0) if not bool(mask.all()) else None

        tokens = torch.full((rows, steps), params.pad_token_id, dtype=torch.long, device=device)
        entropy = torch.zeros(rows, steps, dtype=torch.float32, device=device)
        logprobs = torch.zeros(rows, steps, dtype=torch.float32, device=device)
        active = torch.arange(rows, device=device)  # the output row of each batch row
        done = torch.zeros(rows, dtype=torch.bool, device=device)  # of each batch row
        pad = torch.full((), params.pad_token_id, dtype=torch.long, device=device)
        for step in range(steps):
            token, token_logp, token_entropy = draw(logits, params, truncation)
            # Rows finished but still in the batch drew a token nobody reads: written as padding.
            tokens[active, step] = torch.where(done, pad, token)
            logprobs[active, step] = token_logp.masked_fill(done, 0.0)
            entropy[active, step] = token_entropy.masked_fill(done, 0.0)
            done = done | torch.isin(token, stop_ids)
            if step + 1 == steps:
                break
            if (step + 1) % self.sync_every == 0:
                finished = int(done.sum())  # the host synchronisation
                if finished == done.numel():
                    break
                if finished and finished >= self.compact_threshold * done.numel():
                    keep = (~done).nonzero().squeeze(1)
                    cache.batch_select_indices(keep)
                    active, next_position, token, done = (
                        active[keep],
                        next_position[keep],
                        token[keep],
                        done[keep],
                    )
                    mask = mask[keep] if mask is not None else None
            if mask is not None:
                mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            out = causal_lm(
                input_ids=token[:, None],
                attention_mask=mask,
                position_ids=next_position[:, None],
                past_key_values=cache,
                use_cache=True,
            )
            logits = out.logits[:, -1].float()
            del out
            next_position = next_position + 1
        # The longest completion sets the width (what `generate` returns too).
        stops = torch.isin(tokens, stop_ids)
        lengths = torch.where(stops.any(dim=1), stops.long().argmax(dim=1) + 1, steps)
        width = int(lengths.max())
        return tokens[:, :width], entropy[:, :width], logprobs[:, :width]
