"""An engine that spends compute only on tokens that end up in a completion.

Three kinds of waste in `generate`-style batched sampling of G samples per prompt:

1. The prompt is prefilled G times (once per sample row), though all G forward passes are equal.
   Here each prompt is prefilled once and its KV cache is repeated to its G rows, with the last
   prompt position's logits.
2. The KV cache grows by `torch.cat` (`DynamicCache`): every decode step copies the whole cache of
   every layer, O(T^2) bytes over a completion of T tokens. At a few hundred tokens on CPU this
   copy costs more than the attention that reads the cache. Here the cache of a full-attention
   layer is allocated once for the longest possible sequence (`SlotLayer`); a step writes one
   column in place and attention reads a view.
3. A row that has produced its stop token keeps being stepped (and padded) until the slowest row
   of the batch stops. Here finished rows leave the batch as they end: a live row from the end
   of the batch takes the finished row's slot (its cache, mask and position), so dropping a row
   copies at most one other row, and each decode step costs what the still-running rows need.

Sampling is exactly `generate`'s: the tempered distribution `softmax(logits / T)`, truncated by
`transformers`' own top-k and top-p warpers in `generate`'s order, argmax when greedy. By default
the draws are `generate`'s too: `torch.multinomial(probs, 1)` is `argmax(probs / E)` with `E` a
`[rows, V]` tensor of Exp(1) noise drawn from the global generator, and `generate` draws that
noise for every row at every step, finished or not; this engine draws the same noise and reads the
live rows' part. So from the same seed it samples the same tokens as `transformers.generate` (and
hence as TRL's trainers), up to float rounding of the logits: a drop-in replacement whose output
can be compared run for run. Per-token entropy and sampled-token log-prob of the tempered,
untruncated distribution are recorded on the way; per step, only `[rows, V]` tensors exist.

Distributed: under FSDP2 every forward pass is a collective (it all-gathers the weights), so
ranks decode in lock-step: a rank whose rows have all finished keeps running one-token forward
passes until every rank is done, learning that from one all-reduce of a done flag per check
(`decodes_in_lockstep`; `generate` does the same with `synced_gpus`).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor
from transformers import DynamicCache, LogitsProcessorList, TopKLogitsWarper, TopPLogitsWarper
from transformers.cache_utils import DynamicLayer

from egspo.distributed import all_ranks_agree
from egspo.hf_names import unwrap_causal_lm
from egspo.rollout.engine import Rollout, SamplingParams, decodes_in_lockstep, eval_mode


class SlotLayer(DynamicLayer):
    """One attention layer's KV cache in buffers allocated once, `[rows, kv_heads, capacity, head_dim]`.

    The batch is the first `live` rows, the cache the first `length` columns; `keys` and `values`
    are views of that block (what attention reads). A decode step writes its column in place.

    Args:
        rows: the most rows the batch will hold (prompts x samples).
        capacity: the most tokens a row will hold (prompt width + new tokens).
    """

    def __init__(self, rows: int, capacity: int) -> None:
        super().__init__()
        self.rows, self.capacity = rows, capacity
        self.length = 0
        self.live = 0

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        shape = (self.rows, key_states.shape[1], self.capacity)
        self._keys = key_states.new_empty(*shape, key_states.shape[-1])
        self._values = value_states.new_empty(*shape, value_states.shape[-1])
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[2]
        if end > self.capacity or key_states.shape[0] > self.rows:
            raise RuntimeError(
                f"SlotLayer: {key_states.shape[0]} rows x {end} tokens exceed the allocated "
                f"{self.rows} x {self.capacity}"
            )
        self.live = key_states.shape[0]
        self._keys[: self.live, :, self.length : end] = key_states
        self._values[: self.live, :, self.length : end] = value_states
        self.length = end
        self._set_views()
        return self.keys, self.values

    def _set_views(self) -> None:
        self.keys = self._keys[: self.live, :, : self.length]
        self.values = self._values[: self.live, :, : self.length]

    def get_seq_length(self) -> int:
        return self.length

    def _used(self) -> tuple[Tensor, Tensor]:
        return self._keys[:, :, : self.length], self._values[:, :, : self.length]

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Each of the `live` rows becomes `repeats` consecutive rows (a prompt's samples)."""
        if self.length == 0 or repeats == 1:
            return
        n = self.live
        for buffer in self._used():
            source = buffer[:n].clone()  # the targets overlap the sources
            target = buffer[: n * repeats].view(n, repeats, *source.shape[1:])
            target.copy_(source[:, None].expand_as(target))
        self.live = n * repeats
        self._set_views()

    def batch_select_indices(self, indices: Tensor) -> None:
        """Keep the rows `indices`, in that order (a gather of every kept row; `move_rows` is cheaper)."""
        if self.length:
            for buffer in self._used():
                buffer[: indices.numel()] = buffer[indices]
        self.live = indices.numel()
        self._set_views()

    def move_rows(self, targets: Tensor, sources: Tensor, live: int) -> None:
        """Row `sources[i]` takes slot `targets[i]`; then the batch is the first `live` rows."""
        if targets.numel() and self.length:
            for buffer in self._used():
                buffer.index_copy_(0, targets, buffer.index_select(0, sources))
        self.live = live
        self._set_views()


def slot_cache(causal_lm: torch.nn.Module, rows: int, capacity: int) -> DynamicCache:
    """The model's `DynamicCache` with every full-attention layer's cache preallocated (`SlotLayer`).

    Other layer kinds (sliding windows, linear attention) keep `transformers`' own implementation.
    """
    cache = DynamicCache(config=causal_lm.config)
    if cache.layers:
        cache.layers = [
            SlotLayer(rows, capacity) if type(layer) is DynamicLayer else layer for layer in cache.layers
        ]
    elif cache.layer_class_to_replicate is DynamicLayer:  # layers created on first use
        cache.layer_class_to_replicate = functools.partial(SlotLayer, rows, capacity)
    return cache


def move_cache_rows(cache: DynamicCache, targets: Tensor, sources: Tensor, live: int) -> None:
    """Row `sources[i]` of every layer's cache takes slot `targets[i]`; the batch is then `live` rows."""
    order = None
    for layer in cache.layers:
        if isinstance(layer, SlotLayer):
            layer.move_rows(targets, sources, live)
        else:
            if order is None:
                order = torch.arange(live, device=targets.device)
                order[targets] = sources
            layer.batch_select_indices(order)


def _truncation(params: SamplingParams) -> LogitsProcessorList:
    """Top-k then top-p, as `generate` orders them (its processors, so ties and edge cases match)."""
    warpers = LogitsProcessorList()
    if params.top_k > 0:
        warpers.append(TopKLogitsWarper(top_k=params.top_k))
    if params.top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=params.top_p))
    return warpers


def draw(
    logits: Tensor, params: SamplingParams, truncation: LogitsProcessorList, noise: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """One token per row from `[rows, V]` fp32 logits, with its tempered log-prob and the entropy.

    The token comes from `softmax(logits / T)` cut by `truncation` (argmax when greedy), computed
    as `generate` computes it. With `noise` (`[rows, V]` Exp(1) draws) the token is
    `argmax(probs / noise)`, which is what `torch.multinomial(probs, 1)` computes from the noise
    it draws itself. The log-prob and entropy are those of the uncut tempered distribution, what
    the loss scores.
    """
    scaled = logits / params.temperature if params.temperature != 1.0 else logits
    logp = torch.log_softmax(scaled, dim=-1)
    if params.greedy:
        probs = logp.exp()
        token = logits.argmax(dim=-1)
    else:
        probs = torch.softmax(scaled, dim=-1)
        # The warpers ignore their `input_ids` argument (it serves processors such as penalties).
        sample_from = torch.softmax(truncation(None, scaled), dim=-1) if truncation else probs
        if noise is None:
            token = torch.multinomial(sample_from, 1).squeeze(1)
        else:
            token = (sample_from / noise).argmax(dim=-1)
    entropy = -(probs * logp.nan_to_num(neginf=0.0)).sum(-1)
    return token, logp.gather(1, token[:, None]).squeeze(1), entropy


class SharedPrefillEngine:
    """One prefill per prompt shared by its samples, a preallocated KV cache, finished rows dropped.

    Works with any decoder-only `transformers` model whose cache is a `DynamicCache` (full or
    sliding-window attention), wrapped by peft or not (the LoRA layers live inside the causal LM
    that is called), with left-padded prompts (position ids follow the attention mask, as in
    `generate`). The KV cache of the full-attention layers is allocated for
    `rows x (prompt width + max_new_tokens)` tokens up front: the most `generate`'s cache reaches.

    Args:
        compact_threshold: drop finished rows from the batch once at least this fraction of the
            running rows has finished (0: as soon as one has). Dropping a row copies at most one
            other row's cache, far less than one decode step reads, so 0 is right on CPU. On a
            GPU, where a decode step costs about the same for any number of rows up to hundreds,
            a higher value saves the copies and host synchronisations.
        sync_every: test for finished rows every this many steps. The test waits for the device
            (one host synchronisation); between tests, finished rows keep being stepped and their
            tokens are discarded. 1 costs nothing on CPU; on a GPU a larger value lets the host
            queue several steps ahead (a small model's decode step is bound by kernel launches).
            Under FSDP2 the ranks agree on being done at each test (one all-reduce).
        same_draws_as_generate: draw the Exp(1) noise of every row at every step, as
            `generate` does, so that a seed gives `generate`'s samples (see the module
            docstring). False draws noise for the live rows only (`torch.multinomial` on them):
            samples from the same distribution but not `generate`'s, cheaper when the vocabulary
            is large and the device a CPU (Exp(1) draws cost about 20 ns each there).
    """

    def __init__(
        self, compact_threshold: float = 0.0, sync_every: int = 1, same_draws_as_generate: bool = True
    ) -> None:
        if not 0.0 <= compact_threshold < 1.0:
            raise ValueError(f"compact_threshold must be in [0, 1), got {compact_threshold}")
        if sync_every < 1:
            raise ValueError(f"sync_every must be >= 1, got {sync_every}")
        self.compact_threshold = compact_threshold
        self.sync_every = sync_every
        self.same_draws_as_generate = same_draws_as_generate

    @torch.no_grad()
    def generate(
        self, model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor, params: SamplingParams
    ) -> Rollout:
        causal_lm = unwrap_causal_lm(model)  # peft's LoRA layers live inside it: adapters still apply
        lockstep = decodes_in_lockstep(model)
        with eval_mode(model):
            completion_ids, entropy, logprobs = self._sample(
                causal_lm, input_ids, attention_mask, params, lockstep
            )
        return Rollout.from_completions(
            input_ids, attention_mask, completion_ids, params, entropy=entropy, logprobs=logprobs
        )

    def _sample(
        self,
        causal_lm: torch.nn.Module,
        input_ids: Tensor,
        attention_mask: Tensor,
        params: SamplingParams,
        lockstep: bool,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """`[prompts * num_samples, C]` tokens, entropies and log-probs, C the longest completion.

        Long: the decode loop (draw, record, compact finished rows, step the KV slots) is one loop; split, its order of operations, which decides the draws, would be spread over several places.
        """
        device = input_ids.device
        g, steps = params.num_samples, params.max_new_tokens
        rows = input_ids.shape[0] * g
        truncation = _truncation(params)
        stop_ids = torch.tensor(params.stop_token_ids, dtype=torch.long, device=device)
        noise = self.same_draws_as_generate and not params.greedy

        # Columns that are padding in every prompt carry nothing: they stay out of the prefill.
        mask = attention_mask.long()
        if not bool((mask[:, 1:] >= mask[:, :-1]).all()):
            raise ValueError("SharedPrefillEngine: prompts must be left-padded (padding after a token)")
        first = int(mask.any(dim=0).long().argmax())
        ids, mask = input_ids[:, first:], mask[:, first:]
        width = ids.shape[1]
        positions = (mask.cumsum(-1) - 1).clamp(min=0)

        cache = slot_cache(causal_lm, rows, width + steps)
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
        # The mask of every step, written once: the prompt's, then ones. Without padding the causal
        # mask is implied and (as in `generate`) none is passed.
        full_mask = None
        if not bool(mask.all()):
            full_mask = torch.cat([mask.repeat_interleave(g, dim=0), mask.new_ones(rows, steps)], dim=1)

        tokens = torch.full((rows, steps), params.pad_token_id, dtype=torch.long, device=device)
        entropy = torch.zeros(rows, steps, dtype=torch.float32, device=device)
        logprobs = torch.zeros(rows, steps, dtype=torch.float32, device=device)
        active = torch.arange(rows, device=device)  # the output row of each batch slot
        done = torch.zeros(rows, dtype=torch.bool, device=device)  # of each batch slot
        pad = torch.full((), params.pad_token_id, dtype=torch.long, device=device)
        for step in range(steps):
            step_noise = None
            if noise:  # every row's, live or not, as `generate` draws it
                step_noise = torch.empty(
                    rows, logits.shape[-1], dtype=torch.float32, device=device
                ).exponential_()
                step_noise = step_noise if active.numel() == rows else step_noise[active]
            token, token_logp, token_entropy = draw(logits, params, truncation, step_noise)
            # Rows finished but still in the batch drew a token nobody reads: written as padding.
            tokens[active, step] = torch.where(done, pad, token)
            logprobs[active, step] = token_logp.masked_fill(done, 0.0)
            entropy[active, step] = token_entropy.masked_fill(done, 0.0)
            done = done | torch.isin(token, stop_ids)
            if step + 1 == steps:
                break
            if (step + 1) % self.sync_every == 0:
                finished = int(done.sum())  # the host synchronisation
                local_done = finished == done.numel()
                if all_ranks_agree(local_done) if lockstep else local_done:
                    break
                if local_done:  # other ranks still decode: keep their collectives company
                    self._idle(causal_lm, step, steps, pad)
                    break
                if finished and finished >= self.compact_threshold * done.numel():
                    live = (~done).nonzero().squeeze(1)
                    n = live.numel()
                    targets = done[:n].nonzero().squeeze(1)  # finished slots among the first n
                    sources = live[live >= n]  # live slots after them
                    move_cache_rows(cache, targets, sources, n)
                    if full_mask is not None:
                        full_mask.index_copy_(0, targets, full_mask.index_select(0, sources))
                    for state in (active, next_position, token):
                        state.index_copy_(0, targets, state.index_select(0, sources))
                    active, next_position, token = active[:n], next_position[:n], token[:n]
                    done = done.new_zeros(n)
            length = width + step  # cached tokens; this step adds one
            out = causal_lm(
                input_ids=token[:, None],
                attention_mask=None if full_mask is None else full_mask[: token.numel(), : length + 1],
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

    def _idle(self, causal_lm: torch.nn.Module, step: int, steps: int, pad: Tensor) -> None:
        """One-token forward passes, step for step with the ranks still decoding, until all are done.

        Mirrors the decode loop from the forward pass of `step` on: a forward pass per step, and
        at each test for finished rows the same all-reduce, which the ranks still decoding answer
        with "not done" until their last row ends (or `steps` is reached).
        """
        dummy = pad.reshape(1, 1)
        while True:
            causal_lm(input_ids=dummy, use_cache=False, logits_to_keep=1)
            step += 1
            if step + 1 == steps:
                return
            if (step + 1) % self.sync_every == 0 and all_ranks_agree(True):
                return
