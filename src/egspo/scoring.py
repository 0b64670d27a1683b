"""Per-token log-probabilities and entropies of a causal LM, without `[B, T, V]` logits.

The model runs once over the batch with no logits kept; a forward hook on its decoder sends
only the hidden states that predict scored tokens through the lm_head weight, chunk by chunk,
in the fused op. Doing this inside the model's forward is what makes it work with FSDP2, whose
root unit gathers the lm_head weight in its forward pre-hook (and LoRA, DDP, FSDP1 alike).
"""

from __future__ import annotations

import torch
from torch import Tensor

from egspo.model import unwrap_causal_lm
from egspo.ops import fused_logprobs_entropy


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Positions that skip left padding, as `generate` assigns them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def token_logprobs(
    model: torch.nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    score_mask: Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    buckets: int = 4,
) -> tuple[Tensor, Tensor]:
    """Log-prob of each scored token given its prefix, and the entropy of that prediction.

    Args:
        model: a causal LM, possibly wrapped by peft, DDP or FSDP.
        input_ids, attention_mask: `[B, L]`.
        score_mask: `[B, L]`, 1 where token t is scored (predicted from the state at t-1);
            position 0 is never scored.
        temperature: the sampling temperature: scores are those of the tempered distribution.
        buckets: right-sized batches: rows are grouped by length into up to this many forward
            passes, each as wide as its longest row (1: one pass over the batch as laid out).

    Returns:
        `(logprobs, entropy)`, both `[B, L]` fp32, zero where `score_mask` is 0. Gradient flows
        through `logprobs` only.
    """
    if buckets > 1 and input_ids.shape[0] > 1:
        return _right_sized(model, input_ids, attention_mask, score_mask, buckets, temperature, chunk_size)
    causal_lm = unwrap_causal_lm(model)
    predicts = score_mask[:, 1:].bool()
    targets = input_ids[:, 1:][predicts]
    out: dict[str, Tensor] = {}

    def head(_module: torch.nn.Module, _args: tuple, output) -> None:
        # Inside the causal LM's forward: under FSDP2 its root parameters (lm_head) are gathered.
        hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state
        rows = hidden[:, :-1][predicts]
        weight = causal_lm.get_output_embeddings().weight
        out["logp"], out["entropy"] = fused_logprobs_entropy(
            rows, weight, targets, temperature=temperature, chunk_size=chunk_size
        )

    handle = causal_lm.get_decoder().register_forward_hook(head)
    try:
        # No position is kept for the model's own logits: the lm_head runs on an empty slice.
        causal_lm(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            use_cache=False,
            logits_to_keep=input_ids.new_zeros(0),
        )
    finally:
        handle.remove()
    logprobs = torch.zeros(input_ids.shape, dtype=torch.float32, device=input_ids.device)
    entropy = torch.zeros_like(logprobs)
    scored = torch.zeros_like(score_mask, dtype=torch.bool)
    scored[:, 1:] = predicts
    logprobs = logprobs.masked_scatter(scored, out["logp"])
    entropy = entropy.masked_scatter(scored, out["entropy"])
    return logprobs, entropy


def _right_sized(
    model: torch.nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    score_mask: Tensor,
    buckets: int,
    temperature: float,
    chunk_size: int | None,
) -> tuple[Tensor, Tensor]:
    """`token_logprobs` over length buckets, so that padding is not run through the decoder.

    A rollout row is `[left pad | prompt | completion | right pad]`; padded to the batch's longest
    prompt plus its longest completion, up to half of the positions can be padding. Each row's
    attended tokens are moved to its front (positions and attention are unchanged: position ids
    count attended tokens), rows are sorted by length and split into `buckets` groups, and each
    group runs cut to its longest row. Results go back to the caller's layout.
    """
    valid_first = torch.sort((attention_mask == 0).to(torch.uint8), dim=1, stable=True).indices
    ids, mask, score = (t.gather(1, valid_first) for t in (input_ids, attention_mask, score_mask))
    lengths = mask.sum(1)
    by_length = lengths.argsort(descending=True)
    logprobs = torch.zeros(input_ids.shape, dtype=torch.float32, device=input_ids.device)
    entropy = torch.zeros_like(logprobs)
    for rows in by_length.tensor_split(min(buckets, len(by_length))):
        width = max(int(lengths[rows[0]]), 1)
        logp, ent = token_logprobs(
            model,
            ids[rows, :width],
            mask[rows, :width],
            score[rows, :width],
            temperature=temperature,
            chunk_size=chunk_size,
            buckets=1,
        )
        where = (rows[:, None].expand(-1, width), valid_first[rows, :width])
        logprobs = logprobs.index_put(where, logp)
        entropy = entropy.index_put(where, ent)
    return logprobs, entropy
