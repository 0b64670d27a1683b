"""Per-token log-probabilities and entropies of a causal LM, without `[B, T, V]` logits.

The decoder runs once over the batch; only the hidden states that predict scored tokens go
through the lm_head, chunk by chunk, in the fused op.
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
    chunk_size: int = 1024,
) -> tuple[Tensor, Tensor]:
    """Log-prob of each scored token given its prefix, and the entropy of that prediction.

    Args:
        model: a causal LM, possibly wrapped by peft, DDP or FSDP.
        input_ids, attention_mask: `[B, L]`.
        score_mask: `[B, L]`, 1 where token t is scored (predicted from the state at t-1);
            position 0 is never scored.
        temperature: the sampling temperature: scores are those of the tempered distribution.

    Returns:
        `(logprobs, entropy)`, both `[B, L]` fp32, zero where `score_mask` is 0. Gradient flows
        through `logprobs` only.
    """
    causal_lm = unwrap_causal_lm(model)
    decoder = causal_lm.get_decoder()
    hidden = decoder(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    ).last_hidden_state
    predicts = score_mask[:, 1:].bool()
    rows = hidden[:, :-1][predicts]
    targets = input_ids[:, 1:][predicts]
    weight = causal_lm.get_output_embeddings().weight
    logp, ent = fused_logprobs_entropy(rows, weight, targets, temperature=temperature, chunk_size=chunk_size)
    logprobs = hidden.new_zeros(input_ids.shape, dtype=torch.float32)
    entropy = torch.zeros_like(logprobs)
    scored = torch.zeros_like(score_mask, dtype=torch.bool)
    scored[:, 1:] = predicts
    logprobs = logprobs.masked_scatter(scored, logp)
    entropy = entropy.masked_scatter(scored, ent)
    return logprobs, entropy
