"""Chunked log-prob, entropy and entropy polarity of the next token, from hidden states and the lm_head.

For each row n (one response token) with hidden state ``h_n``, lm_head weight ``W`` [V, D] and
optional bias ``b`` [V], logit scale ``a``, soft-cap ``c``, temperature ``T`` and target ``y_n``::

    r_n      = W h_n + b                               raw lm_head output, [V]
    z_n      = c * tanh(a r_n / c)                     the model's logits (z_n = a r_n without a cap)
    s_n      = z_n / T                                 tempered logits; p_n = softmax(s_n)
    lse_n    = log sum_v exp(s_nv)
    logp_n   = s_n[y_n] - lse_n
    H_n      = lse_n - sum_v p_nv s_nv
    P_n      = p_n[y_n] (logp_n + H_n) - sum_v p_nv^2 (log p_nv + H_n)       entropy polarity

    d s_nv / d r_nv = (a / T) * k_nv,   k_nv = 1 - tanh^2(a r_nv / c)   (k = 1 without a cap)
    d logp_n / d r_n = (a / T) * (onehot(y_n) * k_n - p_n * k_n)
    grad_h_n = g_n (a / T) (k_ny W[y_n] - (p_n * k_n)^T W)
    grad_W   = sum_n g_n (a / T) (onehot(y_n) k_ny - p_n * k_n) h_n^T,   grad_b likewise without h_n

Why the logit transforms: models such as Gemma2 (``final_logit_softcapping``), Cohere (``logit_scale``)
and Granite (``logits_scaling``) do not sample from ``softmax(W h)``; scoring without the transform
gives log-probs of a different distribution than the one the rollout drew from. They are elementwise
and cost one or two passes over a block that is in cache anyway.

Why the polarity: a policy-gradient step ``eta * A * grad logp_a`` on the tempered logits moves them
by ``eta * A * (onehot(a) - p)``; with ``dH/ds_j = -p_j (log p_j + H)`` the first-order entropy change
is ``dH ~ -eta * A * P`` (sampled-token term minus a state-wise correction). Its expectation over
``a ~ p`` is exactly 0. It is a detached statistic for polarity-aware losses (PAPO), like the entropy.

Why chunks: materialising ``[B, T, V]`` logits in fp32 costs ``4 * B * T * V`` bytes (2.5 GB for 4096
tokens of a 152k vocabulary), and autograd keeps several such tensors alive (logits, log-softmax,
their gradients). Here rows are processed in chunks of ``chunk_size``; one fp32 block
``[chunk_size, V]`` exists at a time (two in the frozen-weight forward pass, plus one in the
input dtype for bf16/fp16 inputs, plus cache-sized scratch blocks for the polarity and the soft-cap
slope), and the backward pass recomputes each chunk's logits from the
saved hidden states, weight, bias, targets and per-row log-sum-exp: four matmuls of ``N x V x D``
instead of three, for a memory cost that no longer grows with ``N * V``. On CPU the elementwise
passes over a block run on slices of tens of MB so that they stay in cache, and all buffers are
allocated once per call (fresh multi-GB allocations cost page faults that the plain computation
pays several times).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from .logit_head import LogitHead, tempered_logits

# Rows of one fp32 logit block processed together by the elementwise passes on CPU: tens of MB, so
# that max, exp, sum and the entropy dot product re-read the block from cache, not from memory.
_CPU_BLOCK_BYTES = 32 * 1024 * 1024
# Default size of the fp32 [chunk_size, V] logit block: large enough for efficient matmuls,
# small against the several [N, V] tensors of the plain computation.
_CHUNK_BYTES = 256 * 1024 * 1024


class TokenScores(NamedTuple):
    """Per scored token: log-prob of the target, entropy (nats) and entropy polarity.

    Only ``logprobs`` carries gradient; ``polarity`` is None unless it was asked for.
    Index 0 and 1 are the log-probs and the entropy, as in the former ``(logprobs, entropy)`` pair.
    """

    logprobs: Tensor
    entropy: Tensor
    polarity: Tensor | None = None


def default_chunk_size(vocab: int) -> int:
    """Rows per chunk such that one fp32 ``[rows, vocab]`` block takes about 256 MB (multiple of 64)."""
    return max(64, _CHUNK_BYTES // (4 * vocab) // 64 * 64)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp32 and lower-precision inputs, fp64 for fp64 inputs (for gradcheck)."""
    return torch.promote_types(dtype, torch.float32)


def _block_rows(device: torch.device, rows: int, vocab: int) -> int:
    if device.type != "cpu":
        return max(rows, 1)
    return max(1, min(rows, _CPU_BLOCK_BYTES // (4 * vocab)))


def _buffers(hidden: Tensor, rows: int, vocab: int) -> tuple[Tensor, Tensor | None]:
    buf = torch.empty(rows, vocab, dtype=_acc_dtype(hidden.dtype), device=hidden.device)
    low = None
    if hidden.dtype != buf.dtype:
        low = torch.empty(rows, vocab, dtype=hidden.dtype, device=hidden.device)
    return buf, low


def _forward(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    head: LogitHead,
    chunk_size: int,
    grad_dir: bool,
    with_polarity: bool,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor, Tensor | None]:
    """Return (logprobs, entropy, polarity, lse, grad_dir_hidden) for all rows, chunk by chunk.

    With ``grad_dir`` the direction ``(a / T) (k_y W[y_n] - (p_n * k_n)^T W)`` of the hidden-state
    gradient is computed while the probabilities are at hand (one matmul instead of two in backward);
    the backward pass then only scales it by the upstream gradient. Used when the weight is frozen.
    Long: the chunk loop holds the memory schedule of the op (one chunk of logits alive at a time), kept in one place so it can be read as such.
    """
    n, vocab = hidden.shape[0], weight.shape[0]
    dev, acc = hidden.device, _acc_dtype(hidden.dtype)
    logprobs = torch.empty(n, dtype=acc, device=dev)
    entropy = torch.empty(n, dtype=acc, device=dev)
    polarity = torch.empty(n, dtype=acc, device=dev) if with_polarity else None
    lse = torch.empty(n, dtype=acc, device=dev)
    direction = torch.empty(n, hidden.shape[1], dtype=acc, device=dev) if grad_dir else None
    if n == 0:
        return logprobs, entropy, polarity, lse, direction
    rows = min(chunk_size, n)
    buf, low = _buffers(hidden, rows, vocab)
    block = _block_rows(dev, rows, vocab)
    # exp(s - max) for one block; for grad_dir it must hold the whole chunk for the matmul.
    exp_buf = torch.empty(rows if grad_dir else block, vocab, dtype=acc, device=dev)
    # The products e*y (and e^2 (y - c) for the polarity) overwrite exp(y) unless exp(y) is still needed.
    keep_exp = grad_dir or with_polarity
    prod_buf = torch.empty(block, vocab, dtype=acc, device=dev) if keep_exp else exp_buf
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        c = stop - start
        s = tempered_logits(hidden[start:stop], weight, head, buf[:c], None if low is None else low[:c])
        tgt = targets[start:stop]
        sum_exp = torch.empty(c, dtype=acc, device=dev)
        dot = torch.empty(c, dtype=acc, device=dev)
        row_max = torch.empty(c, 1, dtype=acc, device=dev)
        square_dot = torch.empty(c, dtype=acc, device=dev) if with_polarity else None
        for b0 in range(0, c, block):
            b1 = min(b0 + block, c)
            x = s[b0:b1]
            torch.amax(x, dim=1, keepdim=True, out=row_max[b0:b1])
            x.sub_(row_max[b0:b1])  # y = s - max
            e = exp_buf[b0:b1] if grad_dir else exp_buf[: b1 - b0]
            torch.exp(x, out=e)
            torch.sum(e, dim=1, out=sum_exp[b0:b1])
            prod = prod_buf[: b1 - b0]
            torch.mul(e, x, out=prod)
            torch.sum(prod, dim=1, out=dot[b0:b1])
            if square_dot is not None:
                # log p_v + H = y_v - sum(e y) / sum(e): sum_v e_v^2 (log p_v + H), without cancellation.
                centre = (dot[b0:b1] / sum_exp[b0:b1]).unsqueeze(1)
                torch.sub(x, centre, out=prod).mul_(e).mul_(e)
                torch.sum(prod, dim=1, out=square_dot[b0:b1])
        log_z = sum_exp.log()
        y_tgt = s.gather(1, tgt.unsqueeze(1)).squeeze(1)
        logp = y_tgt - log_z
        logprobs[start:stop] = logp
        entropy[start:stop] = log_z - dot / sum_exp
        lse[start:stop] = row_max.squeeze(1) + log_z
        if polarity is not None:
            centre = dot / sum_exp  # log p_y + H = y_y - centre
            polarity[start:stop] = logp.exp() * (y_tgt - centre) - square_dot / sum_exp.square()
        if direction is not None:
            e = exp_buf[:c]
            k_tgt = 1.0
            if head.post is not None:  # e * k, k = 1 - tanh^2 from the shifted logits y = s - max
                for b0 in range(0, c, block):
                    b1 = min(b0 + block, c)
                    k = torch.add(s[b0:b1], row_max[b0:b1], out=prod_buf[: b1 - b0])
                    e[b0:b1].mul_(head.cap_slope(k))
                k_tgt = head.cap_slope(y_tgt + row_max.squeeze(1)).unsqueeze(1)
            p_w = _prob_matmul(e, weight, None if low is None else low[:c])
            w_tgt = weight.index_select(0, tgt).to(acc)
            direction[start:stop] = (w_tgt * k_tgt - p_w / sum_exp.unsqueeze(1)) * head.mult
    return logprobs, entropy, polarity, lse, direction


def _prob_matmul(p: Tensor, weight: Tensor, low: Tensor | None) -> Tensor:
    """``p @ weight`` ([rows, D], dtype of ``p``); ``p`` is cast to the weight dtype first if needed."""
    if low is None:
        return torch.mm(p, weight)
    low.copy_(p)
    return torch.mm(low, weight).to(p.dtype)


class _FusedLogprobsEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        targets: Tensor,
        scale: float,
        softcap: float | None,
        inv_t: float,
        chunk_size: int,
        with_polarity: bool,
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        eager = need_h and not need_w and not need_b
        head = LogitHead.make(bias, _acc_dtype(hidden.dtype), scale, softcap, inv_t)
        logprobs, entropy, polarity, lse, direction = _forward(
            hidden, weight, targets, head, chunk_size, eager, with_polarity
        )
        if eager:
            ctx.save_for_backward(direction)
        else:
            ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.eager = eager
        ctx.head_args = (scale, softcap, inv_t)
        ctx.chunk_size = chunk_size
        ctx.hidden_dtype = hidden.dtype
        # One call for both: a second call would replace the first.
        ctx.mark_non_differentiable(*(t for t in (entropy, polarity) if t is not None))
        return logprobs, entropy, polarity

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logprobs: Tensor, _grad_entropy: Tensor | None, _grad_polarity: Tensor | None):
        unused = (None,) * 6  # targets, scale, softcap, inv_t, chunk_size, with_polarity
        if ctx.eager:
            (direction,) = ctx.saved_tensors
            grad_h = (direction * grad_logprobs.to(direction.dtype).unsqueeze(1)).to(ctx.hidden_dtype)
            return grad_h, None, None, *unused
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        head = LogitHead.make(bias, lse.dtype, *ctx.head_args)
        with torch.autocast(hidden.device.type, enabled=False):
            grads = _backward(
                hidden,
                weight,
                targets,
                lse,
                grad_logprobs.to(lse.dtype),
                head,
                ctx.chunk_size,
                ctx.needs_input_grad[:3],
            )
        grad_b = None if grads[2] is None else grads[2].to(bias.dtype)
        return grads[0], grads[1], grad_b, *unused


def _backward(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    lse: Tensor,
    grad: Tensor,
    head: LogitHead,
    chunk_size: int,
    needs: tuple[bool, bool, bool],
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    need_h, need_w, need_b = needs
    n, vocab = hidden.shape[0], weight.shape[0]
    dev, acc = hidden.device, lse.dtype
    grad_h = torch.empty_like(hidden) if need_h else None
    grad_w = torch.zeros(weight.shape, dtype=acc, device=dev) if need_w else None
    grad_b = torch.zeros(vocab, dtype=acc, device=dev) if need_b else None
    if n == 0:
        return grad_h, None if grad_w is None else grad_w.to(weight.dtype), grad_b
    rows = min(chunk_size, n)
    buf, low = _buffers(hidden, rows, vocab)
    block = _block_rows(dev, rows, vocab)
    slope = torch.empty(block, vocab, dtype=acc, device=dev) if head.post is not None else None
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        c = stop - start
        h = hidden[start:stop]
        tgt = targets[start:stop]
        low_c = None if low is None else low[:c]
        p = tempered_logits(h, weight, head, buf[:c], low_c)
        k_tgt: Tensor | float = 1.0
        if slope is not None:
            k_tgt = head.cap_slope(p.gather(1, tgt.unsqueeze(1)).squeeze(1))
        neg_lse = lse[start:stop].neg().unsqueeze(1)
        for b0 in range(0, c, block):
            x = p[b0 : b0 + block]
            if slope is None:
                x.add_(neg_lse[b0 : b0 + block]).exp_()  # softmax rows
            else:  # p * k, k = 1 - tanh^2
                k = head.cap_slope(slope[: x.shape[0]].copy_(x))
                x.add_(neg_lse[b0 : b0 + block]).exp_().mul_(k)
        coef = grad[start:stop] * head.mult  # g_n a / T
        coef_tgt = coef * k_tgt  # the target's term of d logp / d r, times g_n
        if low is not None:
            low_c.copy_(p)
        if need_h:
            p_w = torch.mm(p, weight) if low is None else torch.mm(low_c, weight).to(acc)
            w_tgt = weight.index_select(0, tgt).to(acc)
            grad_h[start:stop] = w_tgt * coef_tgt.unsqueeze(1) - p_w * coef.unsqueeze(1)
        if need_w:
            h_scaled = h.to(acc) * coef.unsqueeze(1)  # rows of d logp / d r times h
            if low is None:
                grad_w.addmm_(p.t(), h_scaled, alpha=-1.0)
            else:
                grad_w.sub_(torch.mm(low_c.t(), h_scaled.to(low.dtype)))
            grad_w.index_add_(0, tgt, h.to(acc) * coef_tgt.unsqueeze(1))
        if need_b:
            grad_b.sub_(torch.mv(p.t(), coef)).index_add_(0, tgt, coef_tgt)
    return grad_h, None if grad_w is None else grad_w.to(weight.dtype), grad_b


def _check_positive(name: str, value: float | None) -> None:
    if value is not None and not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")


def fused_logprobs_entropy(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    bias: Tensor | None = None,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    with_polarity: bool = False,
) -> TokenScores:
    """Log-prob of ``targets``, entropy and (optionally) entropy polarity under ``softmax(z / temperature)``.

    ``z = softcap * tanh(logit_scale * (hidden @ weight.T + bias) / softcap)`` (``z = logit_scale *
    (hidden @ weight.T + bias)`` without a soft-cap) are the model's logits; see the module docstring.

    Args:
        hidden: [N, D] final hidden states of the tokens to score (any float dtype).
        weight: [V, D] lm_head weight, same dtype as ``hidden`` (``hidden`` is cast otherwise).
        targets: [N] token ids in ``[0, V)``; drop ignored positions (-100) before calling.
        bias: [V] lm_head bias, or None.
        logit_scale: ``a > 0``, multiplies the lm_head output (Cohere ``logit_scale``; Granite
            ``1 / logits_scaling``).
        softcap: ``c > 0``, Gemma2's ``final_logit_softcapping``; None for no cap.
        temperature: sampling temperature the distribution is taken at.
        chunk_size: rows per fp32 ``[chunk_size, V]`` logit block; memory is
            ``~4 * chunk_size * V`` bytes instead of several ``4 * N * V`` tensors. Default:
            :func:`default_chunk_size` (about 256 MB per block: 384 rows for a 152k vocabulary,
            2048 for 32k).
        with_polarity: also return the entropy polarity (one more pass over each block).

    Returns:
        :class:`TokenScores` of [N] fp32 tensors (fp64 for fp64 inputs); ``entropy`` (nats) and
        ``polarity`` carry no gradient, ``polarity`` is None unless ``with_polarity``.

    The gradient flows to ``hidden``, ``weight`` and ``bias`` as far as they require it; with a frozen
    weight and bias (LoRA) the hidden-state gradient direction is formed during the forward pass, so
    the backward pass costs no matmul.
    Long: input checks and the choice between the autograd and the no-grad path, each a few lines, for one public entry point.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"expected hidden [N, D] and weight [V, D], got {tuple(hidden.shape)} and {tuple(weight.shape)}"
        )
    vocab = weight.shape[0]
    if bias is not None and bias.shape != (vocab,):
        raise ValueError(f"expected bias of shape ({vocab},), got {tuple(bias.shape)}")
    if targets.shape != (hidden.shape[0],):
        raise ValueError(f"expected targets of shape ({hidden.shape[0]},), got {tuple(targets.shape)}")
    _check_positive("temperature", temperature)
    _check_positive("logit_scale", logit_scale)
    _check_positive("softcap", softcap)
    if chunk_size is None:
        chunk_size = default_chunk_size(vocab)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    targets = targets.long()
    if targets.numel() and bool(((targets < 0) | (targets >= vocab)).any()):
        raise ValueError(
            f"targets must lie in [0, {vocab}); got min {int(targets.min())}, max {int(targets.max())} "
            "(remove ignored positions such as -100 before calling)"
        )
    if hidden.dtype != weight.dtype:
        hidden = hidden.to(weight.dtype)
    args = (float(logit_scale), None if softcap is None else float(softcap), 1.0 / float(temperature))
    weight = weight.contiguous()
    with torch.autocast(hidden.device.type, enabled=False):
        needs_grad = hidden.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
        if torch.is_grad_enabled() and needs_grad:
            return TokenScores(
                *_FusedLogprobsEntropy.apply(hidden, weight, bias, targets, *args, chunk_size, with_polarity)
            )
        head = LogitHead.make(bias, _acc_dtype(hidden.dtype), *args)
        logprobs, entropy, polarity, _, _ = _forward(
            hidden, weight, targets, head, chunk_size, False, with_polarity
        )
        return TokenScores(logprobs, entropy, polarity)
