"""Padding never changes a loss or receives gradient, whatever it holds."""

import pytest
import torch

from egspo.losses import (
    CEGPPOLoss,
    ChordPhiLoss,
    EGSPOLoss,
    EntropyGate,
    ESPOLoss,
    NLLLoss,
    PAPOLoss,
    PolicyLoss,
    PPOClipLoss,
    TokenBatch,
)

B, T = 3, 7
GARBAGE = torch.tensor([float("inf"), float("-inf"), float("nan"), 1e30, -1e30, 88.0, -1e4])


def mask() -> torch.Tensor:
    m = torch.zeros(B, T)
    m[0, :7] = 1
    m[1, 2:5] = 1  # left and right padding
    m[2, :1] = 1
    return m


def make_batch(garbage: bool) -> TokenBatch:
    gen = torch.Generator().manual_seed(7)
    fields = {
        "logprobs": -torch.rand(B, T, generator=gen) * 3,
        "old_logprobs": -torch.rand(B, T, generator=gen) * 3,
        "advantages": torch.randn(B, T, generator=gen),
        "entropy": torch.rand(B, T, generator=gen) * 4,
        "ref_logprobs": -torch.rand(B, T, generator=gen) * 3,
        "polarity": torch.randn(B, T, generator=gen) * 0.3,
    }
    m = mask()
    if garbage:
        pad = m == 0
        for i, (name, value) in enumerate(fields.items()):
            fill = GARBAGE.roll(i).repeat(T)[: int(pad.sum())]
            value[pad] = fill
            fields[name] = value
    fields["logprobs"].requires_grad_()
    return TokenBatch(mask=m, **fields)


def papo() -> PAPOLoss:
    loss = PAPOLoss(beta=0.1, dual_clip=3.0)
    loss.load_state_dict({"balance": 0.4})  # unequal branch weights, so that polarity matters
    return loss


def sum_norm() -> PPOClipLoss:
    loss = PPOClipLoss(loss_agg_mode="seq-mean-token-sum-norm", beta=0.1)
    loss.setup(vocab_size=50, max_completion_length=T)
    return loss


POLICY_LOSSES = {
    "ppo": PPOClipLoss,
    "dapo-dual-k1": lambda: PPOClipLoss(clip_high=0.28, dual_clip=3.0, beta=0.1, kl_estimator="k1"),
    "ppo-seq-mean-k2": lambda: PPOClipLoss(loss_agg_mode="seq-mean-token-mean", beta=0.1, kl_estimator="k2"),
    "ppo-seq-sum": lambda: PPOClipLoss(loss_agg_mode="seq-mean-token-sum"),
    "ppo-sum-norm-k3": sum_norm,
    "egspo": EGSPOLoss,
    "egspo-soft-chord": lambda: EGSPOLoss(
        gate=EntropyGate(soft=True), low_entropy_weight="p(1-p)", beta=0.05
    ),
    "egspo-normalized": lambda: EGSPOLoss(gate=EntropyGate(rule="normalized", value=0.3, vocab_size=50)),
    "espo": lambda: ESPOLoss(vocab_size=50, beta=0.1),
    "cegppo": lambda: CEGPPOLoss(beta=0.1, kl_estimator="k2"),
    "papo": papo,
}


def with_threshold(loss_fn: PolicyLoss, batch: TokenBatch) -> TokenBatch:
    """The batch with the threshold ``prepare`` gives over its valid tokens (for gated losses)."""
    batch.entropy_threshold = loss_fn.prepare(batch.entropy[batch.mask > 0])
    return batch


@pytest.mark.parametrize("make_loss", POLICY_LOSSES.values(), ids=POLICY_LOSSES.keys())
def test_policy_loss_ignores_padding(make_loss):
    loss_fn = make_loss()
    clean = with_threshold(loss_fn, make_batch(garbage=False))
    dirty = make_batch(garbage=True)
    dirty.entropy_threshold = clean.entropy_threshold
    out_clean, out_dirty = loss_fn(clean), loss_fn(dirty)
    out_clean.loss.backward()
    out_dirty.loss.backward()
    assert torch.isfinite(out_dirty.loss)
    assert out_clean.loss.item() != 0.0
    torch.testing.assert_close(out_dirty.loss, out_clean.loss, rtol=0, atol=0)
    torch.testing.assert_close(dirty.logprobs.grad, clean.logprobs.grad, rtol=0, atol=0)
    assert torch.all(dirty.logprobs.grad[mask() == 0] == 0)
    assert torch.any(dirty.logprobs.grad[mask() > 0] != 0)
    assert out_dirty.metrics.keys() == out_clean.metrics.keys()
    for name, value in out_dirty.metrics.items():
        torch.testing.assert_close(value, out_clean.metrics[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize(
    "loss_fn", [NLLLoss(), ChordPhiLoss(loss_agg_mode="seq-mean-token-sum-norm", norm_constant=float(T))]
)
def test_sft_loss_ignores_padding(loss_fn):
    clean, dirty = make_batch(garbage=False), make_batch(garbage=True)
    out_clean = loss_fn(clean.logprobs, clean.mask)
    out_dirty = loss_fn(dirty.logprobs, dirty.mask)
    out_clean.loss.backward()
    out_dirty.loss.backward()
    torch.testing.assert_close(out_dirty.loss, out_clean.loss, rtol=0, atol=0)
    torch.testing.assert_close(dirty.logprobs.grad, clean.logprobs.grad, rtol=0, atol=0)
    assert torch.all(dirty.logprobs.grad[mask() == 0] == 0)


@pytest.mark.parametrize("make_loss", POLICY_LOSSES.values(), ids=POLICY_LOSSES.keys())
def test_policy_loss_with_empty_mask_is_zero_and_finite(make_loss):
    loss_fn = make_loss()
    batch = make_batch(garbage=True)
    batch.mask = torch.zeros(B, T)
    out = loss_fn(with_threshold(loss_fn, batch))
    out.loss.backward()
    assert out.loss.item() == 0.0
    assert torch.all(batch.logprobs.grad == 0)
    assert all(torch.isfinite(v) for v in out.metrics.values())


@pytest.mark.parametrize("dtype", [torch.long, torch.bool])
def test_integer_and_bool_masks_match_float_mask(dtype):
    loss_fn = POLICY_LOSSES["egspo-soft-chord"]()
    reference = loss_fn(with_threshold(loss_fn, make_batch(garbage=True))).loss
    batch = with_threshold(loss_fn, make_batch(garbage=True))
    batch.mask = batch.mask.to(dtype)
    assert torch.equal(loss_fn(batch).loss, reference)
    sft = ChordPhiLoss()(batch.logprobs, batch.mask).loss
    assert torch.equal(sft, ChordPhiLoss()(batch.logprobs, mask()).loss)
