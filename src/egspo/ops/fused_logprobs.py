"""Chunked log-prob and entropy of the next token, straight from hidden states and the lm_head weight.

For each row n (one response token) with hidden state ``h_n``, lm_head weight ``W`` [V, D],
temperature ``T`` and target token ``y_n``::

    s_n      = W h_n / T                              tempered logits, [V]
    lse_n    = log sum_v exp(s_nv)
    logp_n   = s_n[y_n] - lse_n
    H_n      = lse_n - sum_v p_nv s_nv,   p_n = softmax(s_n)

    d logp_n / d z_n = (onehot(y_n) - p_n) / T        z_n = W h_n, the raw logits
    grad_h_n = g_n (W[y_n] - p_n^T W) / T
    grad_W   = sum_n g_n (onehot(y_n) - p_n) h_n^T / T

Why: materialising ``[B, T, V]`` logits in fp32 costs ``4 * B * T * V`` bytes (2.5 GB for 4096
tokens of a 152k vocabulary), and autograd keeps several such tensors alive (logits, log-softmax,
their gradients). Here rows are processed in chunks of ``chunk_size``; one fp32 block
``[chunk_size, V]`` exists at a time (two in the frozen-weight forward pass, plus one in the
input dtype for bf16/fp16 inputs), and the backward pass recomputes each chunk's logits from the
saved hidden states, weight, targets and per-row log-sum-exp: four matmuls of ``N x V x D``
instead of three, for a memory cost that no longer grows with ``N * V``. On CPU the elementwise
passes over a block run on slices of tens of MB so that they stay in cache, and all buffers are
allocated once per call (fresh multi-GB allocations cost page faults that the plain computation
pays several times).

The entropy is a detached statistic (it feeds the entropy gate, never the gradient).
"""

from __future__ import annotations

import torch
from torch import Tensor

# Rows of one fp32 logit block processed together by the elementwise passes on CPU: tens of MB, so
# that max, exp, sum and the entropy dot product re-read the block from cache, not from memory.
_CPU_BLOCK_BYTES = 32 * 1024 * 1024
# Default size of the fp32 [chunk_size, V] logit block: large enough for efficient matmuls,
# small against the several [N, V] tensors of the plain computation.
_CHUNK_BYTES = 256 * 1024 * 1024


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


def _tempered_logits(h: Tensor, weight: Tensor, inv_t: float, out: Tensor, low: Tensor | None) -> Tensor:
    """Write ``h @ weight.T * inv_t`` into ``out`` (a view of the fp32/fp64 chunk buffer).

    fp32/fp64 inputs: the temperature is folded into the small ``h`` so the matmul writes the final
    values. Lower precision: the matmul runs in the input dtype into ``low``, then is upcast.
    """
    if low is None:
        torch.mm(h * inv_t if inv_t != 1.0 else h, weight.t(), out=out)
        return out
    torch.mm(h, weight.t(), out=low)
    out.copy_(low)
    if inv_t != 1.0:
        out.mul_(inv_t)
    return out


def _buffers(hidden: Tensor, rows: int, vocab: int) -> tuple[Tensor, Tensor | None]:
    buf = torch.empty(rows, vocab, dtype=_acc_dtype(hidden.dtype), device=hidden.device)
    low = None
    if hidden.dtype != buf.dtype:
        low = torch.empty(rows, vocab, dtype=hidden.dtype, device=hidden.device)
    return buf, low


def _forward(
    hidden: Tensor, weight: Tensor, targets: Tensor, inv_t: float, chunk_size: int, grad_dir: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Return (logprobs, entropy, lse, grad_dir_hidden) for all rows, chunk by chunk.

    With ``grad_dir`` the direction ``(W[y_n] - p_n^T W) / T`` of the hidden-state gradient is
    computed while the probabilities are at hand (one matmul instead of two in backward); the
    backward pass then only scales it by the upstream gradient. Used when the weight is frozen.
    """
    n, vocab = hidden.shape[0], weight.shape[0]
    dev, acc = hidden.device, _acc_dtype(hidden.dtype)
    logprobs = torch.empty(n, dtype=acc, device=dev)
    entropy = torch.empty(n, dtype=acc, device=dev)
    lse = torch.empty(n, dtype=acc, device=dev)
    direction = torch.empty(n, hidden.shape[1], dtype=acc, device=dev) if grad_dir else None
    if n == 0:
        return logprobs, entropy, lse, direction
    rows = min(chunk_size, n)
    buf, low = _buffers(hidden, rows, vocab)
    block = _block_rows(dev, rows, vocab)
    # exp(s - max) for one block; for grad_dir it must hold the whole chunk for the matmul.
    exp_buf = torch.empty(rows if grad_dir else block, vocab, dtype=acc, device=dev)
    prod_buf = torch.empty(block, vocab, dtype=acc, device=dev) if grad_dir else exp_buf
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        c = stop - start
        s = _tempered_logits(hidden[start:stop], weight, inv_t, buf[:c], None if low is None else low[:c])
        tgt = targets[start:stop]
        sum_exp = torch.empty(c, dtype=acc, device=dev)
        dot = torch.empty(c, dtype=acc, device=dev)
        row_max = torch.empty(c, 1, dtype=acc, device=dev)
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
        log_z = sum_exp.log()
        y_tgt = s.gather(1, tgt.unsqueeze(1)).squeeze(1)
        logprobs[start:stop] = y_tgt - log_z
        entropy[start:stop] = log_z - dot / sum_exp
        lse[start:stop] = row_max.squeeze(1) + log_z
        if direction is not None:
            p_w = _prob_matmul(exp_buf[:c], weight, None if low is None else low[:c])
            w_tgt = weight.index_select(0, tgt).to(acc)
            direction[start:stop] = (w_tgt - p_w / sum_exp.unsqueeze(1)) * inv_t
    return logprobs, entropy, lse, direction


def _prob_matmul(p: Tensor, weight: Tensor, low: Tensor | None) -> Tensor:
    """``p @ weight`` ([rows, D], dtype of ``p``); ``p`` is cast to the weight dtype first if needed."""
    if low is None:
        return torch.mm(p, weight)
    low.copy_(p)
    return torch.mm(low, weight).to(p.dtype)


class _FusedLogprobsEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, hidden: Tensor, weight: Tensor, targets: Tensor, inv_t: float, chunk_size: int
    ) -> tuple[Tensor, Tensor]:
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        eager = need_h and not need_w
        logprobs, entropy, lse, direction = _forward(hidden, weight, targets, inv_t, chunk_size, eager)
        if eager:
            ctx.save_for_backward(direction)
        else:
            ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.eager = eager
        ctx.inv_t = inv_t
        ctx.chunk_size = chunk_size
        ctx.hidden_dtype = hidden.dtype
        ctx.mark_non_differentiable(entropy)
        return logprobs, entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logprobs: Tensor, _grad_entropy: Tensor | None):
        if ctx.eager:
            (direction,) = ctx.saved_tensors
            grad_h = (direction * grad_logprobs.to(direction.dtype).unsqueeze(1)).to(ctx.hidden_dtype)
            return grad_h, None, None, None, None
        hidden, weight, targets, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        with torch.autocast(hidden.device.type, enabled=False):
            grad_h, grad_w = _backward(
                hidden,
                weight,
                targets,
                lse,
                grad_logprobs.to(lse.dtype),
                ctx.inv_t,
                ctx.chunk_size,
                need_h,
                need_w,
            )
        return grad_h, grad_w, None, None, None


def _backward(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    lse: Tensor,
    grad: Tensor,
    inv_t: float,
    chunk_size: int,
    need_h: bool,
    need_w: bool,
) -> tuple[Tensor | None, Tensor | None]:
    n, vocab = hidden.shape[0], weight.shape[0]
    dev, acc = hidden.device, lse.dtype
    grad_h = torch.empty_like(hidden) if need_h else None
    grad_w = torch.zeros(weight.shape, dtype=acc, device=dev) if need_w else None
    if n == 0:
        return grad_h, None if grad_w is None else grad_w.to(weight.dtype)
    rows = min(chunk_size, n)
    buf, low = _buffers(hidden, rows, vocab)
    block = _block_rows(dev, rows, vocab)
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        c = stop - start
        h = hidden[start:stop]
        tgt = targets[start:stop]
        low_c = None if low is None else low[:c]
        p = _tempered_logits(h, weight, inv_t, buf[:c], low_c)
        neg_lse = lse[start:stop].neg().unsqueeze(1)
        for b0 in range(0, c, block):
            p[b0 : b0 + block].add_(neg_lse[b0 : b0 + block]).exp_()  # softmax rows
        coef = grad[start:stop] * inv_t  # g_n / T
        if low is not None:
            low_c.copy_(p)
        if need_h:
            p_w = torch.mm(p, weight) if low is None else torch.mm(low_c, weight).to(acc)
            w_tgt = weight.index_select(0, tgt).to(acc)
            grad_h[start:stop] = (w_tgt - p_w) * coef.unsqueeze(1)
        if need_w:
            h_scaled = h.to(acc) * coef.unsqueeze(1)  # rows of d logp / d z times h
            if low is None:
                grad_w.addmm_(p.t(), h_scaled, alpha=-1.0)
            else:
                grad_w.sub_(torch.mm(low_c.t(), h_scaled.to(low.dtype)))
            grad_w.index_add_(0, tgt, h_scaled)
    return grad_h, None if grad_w is None else grad_w.to(weight.dtype)


def fused_logprobs_entropy(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Log-probability of ``targets`` and entropy under ``softmax(hidden @ weight.T / temperature)``.

    Args:
        hidden: [N, D] final hidden states of the tokens to score (any float dtype).
        weight: [V, D] lm_head weight, same dtype as ``hidden`` (``hidden`` is cast otherwise).
        targets: [N] token ids in ``[0, V)``; drop ignored positions (-100) before calling.
        temperature: sampling temperature the distribution is taken at.
        chunk_size: rows per fp32 ``[chunk_size, V]`` logit block; memory is
            ``~4 * chunk_size * V`` bytes instead of several ``4 * N * V`` tensors. Default:
            :func:`default_chunk_size` (about 256 MB per block: 384 rows for a 152k vocabulary,
            2048 for 32k).

    Returns:
        ``(logprobs, entropy)``, both [N] fp32 (fp64 for fp64 inputs); ``entropy`` (nats) carries
        no gradient.

    The gradient flows to ``hidden`` and/or ``weight`` as far as they require it; with a frozen
    weight (LoRA) the hidden-state gradient direction is formed during the forward pass, so the
    backward pass costs no matmul.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"expected hidden [N, D] and weight [V, D], got {tuple(hidden.shape)} and {tuple(weight.shape)}"
        )
    if targets.shape != (hidden.shape[0],):
        raise ValueError(f"expected targets of shape ({hidden.shape[0]},), got {tuple(targets.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    vocab = weight.shape[0]
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
    inv_t = 1.0 / float(temperature)
    with torch.autocast(hidden.device.type, enabled=False):
        if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
            return _FusedLogprobsEntropy.apply(hidden, weight.contiguous(), targets, inv_t, chunk_size)
        logprobs, entropy, _, _ = _forward(hidden, weight.contiguous(), targets, inv_t, chunk_size, False)
        return logprobs, entropy
