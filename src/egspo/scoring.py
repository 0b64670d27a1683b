"""Per-token log-probabilities, entropies and entropy polarities of a causal LM, without `[B, T, V]` logits.

The model runs once over the batch with no logits kept; a forward hook on its decoder sends
only the hidden states that predict scored tokens through the lm_head, chunk by chunk, in the
fused op. Doing this inside the model's forward is what makes it work with FSDP2, whose root
unit gathers the lm_head weight in its forward pre-hook (and LoRA, DDP, FSDP1 alike).

The scores must be those of the distribution the model samples from, so the lm_head's bias and
the model family's own logit transform (Gemma2's soft-cap, Cohere's and Granite's scales) are
applied as the model's forward applies them; a family whose config carries a logit transform
egspo does not know is refused rather than scored wrongly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from egspo.hf_names import unwrap_causal_lm
from egspo.ops import TokenScores, fused_logprobs_entropy

__all__ = ["TokenScores", "logit_transform", "position_ids_from_mask", "token_logprobs"]


@dataclass(frozen=True)
class _HeadRule:
    """How a model family's `ForCausalLM.forward` turns the lm_head output into logits."""

    field: str
    kind: Literal["softcap", "multiply", "divide"]


# model_type -> its logit transform, as read in transformers 5.x `modeling_<type>.py` (each one is
# checked against the model's own logits in tests/unit/test_scoring.py). The same config field does not
# mean the same thing across families: Granite divides by `logits_scaling`, HyperCLOVAX multiplies.
_HEAD_RULES: dict[str, _HeadRule] = {
    "gemma2": _HeadRule("final_logit_softcapping", "softcap"),
    "gemma3_text": _HeadRule("final_logit_softcapping", "softcap"),
    "cohere": _HeadRule("logit_scale", "multiply"),
    "cohere2": _HeadRule("logit_scale", "multiply"),
    "granite": _HeadRule("logits_scaling", "divide"),
    "granitemoe": _HeadRule("logits_scaling", "divide"),
}
# Config fields with which some transformers family changes its logits after the lm_head.
_TRANSFORM_FIELDS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier")


def logit_transform(causal_lm: Any) -> dict[str, float | None]:
    """`logit_scale` and `softcap` of the fused op that reproduce `causal_lm`'s logits.

    Raises ValueError, naming the model and the config field, for a family whose config sets a
    logit transform that egspo has not verified (its scores would not be the sampled distribution's).
    """
    config = causal_lm.config
    model_type = getattr(config, "model_type", None)
    rule = _HEAD_RULES.get(model_type)
    if rule is None:
        for name in _TRANSFORM_FIELDS:
            value = getattr(config, name, None)
            if value is not None and value != 1.0:
                raise ValueError(
                    f"{type(causal_lm).__name__} (model_type={model_type!r}) sets config.{name}={value}, a "
                    "logit transform egspo's fused log-prob head does not apply; its scores would not "
                    "match the model's logits"
                )
        return {"logit_scale": 1.0, "softcap": None}
    value = getattr(config, rule.field, None)
    if rule.kind == "softcap":
        return {"logit_scale": 1.0, "softcap": None if value is None else float(value)}
    if value is None:
        raise ValueError(f"{type(causal_lm).__name__}: config.{rule.field} is None; the model cannot run")
    scale = float(value) if rule.kind == "multiply" else 1.0 / float(value)
    return {"logit_scale": scale, "softcap": None}


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
    with_polarity: bool = False,
) -> TokenScores:
    """Log-prob of each scored token given its prefix, the entropy of that prediction and its polarity.

    Args:
        model: a causal LM, possibly wrapped by peft, DDP or FSDP.
        input_ids, attention_mask: `[B, L]`.
        score_mask: `[B, L]`, 1 where token t is scored (predicted from the state at t-1);
            position 0 is never scored.
        temperature: the sampling temperature: scores are those of the tempered distribution.
        buckets: right-sized batches: rows are grouped by length into up to this many forward
            passes, each as wide as its longest row (1: one pass over the batch as laid out).
        with_polarity: also compute the entropy polarity of each scored token (see
            :mod:`egspo.ops.fused_logprobs`), for polarity-aware losses.

    Returns:
        :class:`TokenScores` `(logprobs, entropy, polarity)`, each `[B, L]` fp32 and zero where
        `score_mask` is 0 (`polarity` None unless asked for). Gradient flows through `logprobs` only.
    Long: the decoder pass, the response-position gather and the fused head are one pipeline whose shapes are easiest to follow in one place.
    """
    if buckets > 1 and input_ids.shape[0] > 1:
        return _right_sized(
            model, input_ids, attention_mask, score_mask, buckets, temperature, chunk_size, with_polarity
        )
    causal_lm = unwrap_causal_lm(model)
    transform = logit_transform(causal_lm)
    predicts = score_mask[:, 1:].bool()
    targets = input_ids[:, 1:][predicts]
    out: list[TokenScores] = []

    def head(_module: torch.nn.Module, _args: tuple, output) -> None:
        # Inside the causal LM's forward: under FSDP2 its root parameters (lm_head) are gathered.
        hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state
        rows = hidden[:, :-1][predicts]
        lm_head = causal_lm.get_output_embeddings()
        scores = fused_logprobs_entropy(
            rows,
            lm_head.weight,
            targets,
            bias=getattr(lm_head, "bias", None),
            temperature=temperature,
            chunk_size=chunk_size,
            with_polarity=with_polarity,
            **transform,
        )
        out.append(scores)

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
    scored = torch.zeros_like(score_mask, dtype=torch.bool)
    scored[:, 1:] = predicts
    zeros = torch.zeros(input_ids.shape, dtype=torch.float32, device=input_ids.device)
    return TokenScores(*(None if x is None else zeros.masked_scatter(scored, x) for x in out[0]))


def _right_sized(
    model: torch.nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    score_mask: Tensor,
    buckets: int,
    temperature: float,
    chunk_size: int | None,
    with_polarity: bool,
) -> TokenScores:
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
    zeros = torch.zeros(input_ids.shape, dtype=torch.float32, device=input_ids.device)
    fields: list[Tensor | None] = [zeros, zeros, zeros if with_polarity else None]
    for rows in by_length.tensor_split(min(buckets, len(by_length))):
        width = max(int(lengths[rows[0]]), 1)
        part = token_logprobs(
            model,
            ids[rows, :width],
            mask[rows, :width],
            score[rows, :width],
            temperature=temperature,
            chunk_size=chunk_size,
            buckets=1,
            with_polarity=with_polarity,
        )
        where = (rows[:, None].expand(-1, width), valid_first[rows, :width])
        fields = [None if f is None else f.index_put(where, x) for f, x in zip(fields, part, strict=True)]
    return TokenScores(*fields)
