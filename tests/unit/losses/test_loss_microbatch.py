"""Micro-batch losses weighted by their share of aggregation units add up to the single-pass loss.

This is what gradient accumulation relies on: one optimizer step over micro-batches must take the
gradient of the mini-batch's loss, whatever the loss, its aggregation mode and the split.
"""

from dataclasses import fields, replace

import pytest
import torch

from egspo.losses import (
    AGG_MODES,
    CEGPPOLoss,
    EGSPOLoss,
    EntropyGate,
    ESPOLoss,
    PAPOLoss,
    PolicyLoss,
    PPOClipLoss,
    TokenBatch,
    aggregation_units,
)

B, T = 7, 9
SPLITS = {
    "pairs": [[0, 3], [1, 4], [2, 5, 6]],
    "single-rows": [[i] for i in range(B)],
    "uneven": [[6], [0, 1, 2, 3, 4, 5]],
}


def make_batch() -> TokenBatch:
    gen = torch.Generator().manual_seed(21)
    lengths = [9, 4, 0, 7, 1, 9, 3]  # an empty row and a one-token row
    mask = (torch.arange(T) < torch.tensor(lengths)[:, None]).float()
    old = -torch.rand(B, T, generator=gen, dtype=torch.float64) * 2
    log_ratio = torch.randn(B, T, generator=gen, dtype=torch.float64) * 0.3  # off-policy: clips are active
    return TokenBatch(
        logprobs=(old + log_ratio).requires_grad_(),
        old_logprobs=old,
        advantages=torch.randn(B, 1, generator=gen, dtype=torch.float64).expand(B, T).clone(),
        entropy=torch.rand(B, T, generator=gen, dtype=torch.float64) * 3,
        mask=mask,
        ref_logprobs=old - torch.rand(B, T, generator=gen, dtype=torch.float64) * 0.2,
        polarity=torch.randn(B, T, generator=gen, dtype=torch.float64) * 0.2,
    )


def rows(batch: TokenBatch, index: list[int]) -> TokenBatch:
    """The sub-batch of the given rows, sharing the autograd graph of ``batch.logprobs``."""
    picked = {
        f.name: getattr(batch, f.name)[index]
        for f in fields(batch)
        if f.name != "entropy_threshold" and getattr(batch, f.name) is not None
    }
    return replace(batch, **picked)


def papo() -> PAPOLoss:
    loss = PAPOLoss(beta=0.05, kl_estimator="k2")
    loss.load_state_dict({"balance": 0.3})
    return loss


LOSSES = {
    **{f"ppo-{mode}": (lambda mode=mode: PPOClipLoss(loss_agg_mode=mode, beta=0.1)) for mode in AGG_MODES},
    "egspo-quantile": lambda: EGSPOLoss(dual_clip=3.0, loss_agg_mode="seq-mean-token-mean"),
    "egspo-soft-chord": lambda: EGSPOLoss(gate=EntropyGate(soft=True), low_entropy_weight="p(1-p)"),
    "cegppo": lambda: CEGPPOLoss(loss_agg_mode="seq-mean-token-sum-norm", beta=0.1),
    "espo": lambda: ESPOLoss(high_entropy_fraction=0.3, alpha=0.5, beta=0.1),
    "papo": papo,
}


@pytest.mark.parametrize("split", SPLITS.values(), ids=SPLITS.keys())
@pytest.mark.parametrize("make_loss", LOSSES.values(), ids=LOSSES.keys())
def test_weighted_micro_batch_losses_sum_to_the_single_pass(make_loss, split):
    loss_fn: PolicyLoss = make_loss()
    loss_fn.setup(vocab_size=50, max_completion_length=T)
    batch = make_batch()
    batch.entropy_threshold = loss_fn.prepare(batch.entropy[batch.mask > 0])
    mode = loss_fn.loss_agg_mode

    single = loss_fn(batch).loss
    (single_grad,) = torch.autograd.grad(single, batch.logprobs)

    total = aggregation_units(batch.mask, mode)
    parts = sum(
        loss_fn(rows(batch, index)).loss * (aggregation_units(batch.mask[index], mode) / total)
        for index in split
    )
    (parts_grad,) = torch.autograd.grad(parts, batch.logprobs)

    assert single_grad.abs().max() > 0
    torch.testing.assert_close(parts, single, rtol=0, atol=1e-6)
    torch.testing.assert_close(parts_grad, single_grad, rtol=0, atol=1e-6)
