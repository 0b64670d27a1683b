"""The lm_head's output transform, block by block: raw outputs to the tempered logits a model samples from.

``r = W h + b`` is what the lm_head computes; models then scale it (Cohere ``logit_scale``, Granite
``logits_scaling``) or soft-cap it (Gemma2 ``final_logit_softcapping``), and sampling divides by the
temperature. `LogitHead` folds those into as few passes as possible over a block that is in cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class LogitHead:
    """How a block of raw lm_head outputs becomes tempered logits: ``s = post * tanh(pre * r)`` or ``pre * r``.

    ``pre`` is folded into the hidden states before the matmul (fp32/fp64) and ``bias`` is the lm_head
    bias already multiplied by ``pre``; ``mult = a / T`` is the derivative of ``s`` wrt ``r`` up to the
    soft-cap factor ``k = 1 - (s / post)^2``.
    """

    pre: float
    bias: Tensor | None
    post: float | None
    mult: float

    @staticmethod
    def make(
        bias: Tensor | None, acc: torch.dtype, scale: float, softcap: float | None, inv_t: float
    ) -> LogitHead:
        pre = scale / softcap if softcap is not None else scale * inv_t
        post = softcap * inv_t if softcap is not None else None
        scaled_bias = None if bias is None else bias.to(acc) * pre
        return LogitHead(pre=pre, bias=scaled_bias, post=post, mult=scale * inv_t)

    def cap_slope(self, s: Tensor) -> Tensor:
        """``k = 1 - tanh^2``, computed in place from tempered logits ``s`` (``s`` is overwritten)."""
        return s.mul_(1.0 / self.post).square_().neg_().add_(1.0)


def tempered_logits(h: Tensor, weight: Tensor, head: LogitHead, out: Tensor, low: Tensor | None) -> Tensor:
    """Write the tempered logits ``s`` of the rows ``h`` into ``out`` (a view of the fp32/fp64 chunk buffer).

    fp32/fp64 inputs: ``pre`` is folded into the small ``h`` so the matmul writes scaled values. Lower
    precision: the matmul runs in the input dtype into ``low``, then is upcast and scaled.
    """
    if low is None:
        torch.mm(h * head.pre if head.pre != 1.0 else h, weight.t(), out=out)
    else:
        torch.mm(h, weight.t(), out=low)
        out.copy_(low)
        if head.pre != 1.0:
            out.mul_(head.pre)
    if head.bias is not None:
        out.add_(head.bias)
    if head.post is not None:
        out.tanh_().mul_(head.post)
    return out
