"""CISPOLoss against a plain reference: the stop-gradient clipped IS weight keeps every token's gradient."""

import pytest
import torch

from egspo.losses import CISPOLoss, PPOClipLoss, TokenBatch

LOG_R = [[0.0, 2.0, -0.5, 0.1], [-3.0, 0.3, 0.0, 0.0]]  # r = 1, 7.39, 0.61, 1.105 | 0.05, 1.35
ADV = [[1.0, 1.0, -1.0, 1.0], [-0.5, -0.5, 0.0, 0.0]]
MASK = [[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]]


def make_batch(log_r=LOG_R, adv=ADV, mask=MASK, pad_value=0.0):
    log_r, mask = torch.tensor(log_r, dtype=torch.float64), torch.tensor(mask)
    old = torch.full(log_r.shape, -0.9, dtype=torch.float64)
    logprobs = torch.where(mask > 0, old + log_r, torch.full_like(log_r, pad_value))
    return TokenBatch(
        logprobs=logprobs.requires_grad_(),
        old_logprobs=old,
        advantages=torch.tensor(adv, dtype=torch.float64),
        entropy=torch.ones(log_r.shape),
        mask=mask,
    )


def reference(batch, low, high):
    """Token-mean of -sg(clip(r, low, high)) * A * logp, in plain loops."""
    total, count = 0.0, 0
    for i in range(batch.mask.shape[0]):
        for t in range(batch.mask.shape[1]):
            if batch.mask[i, t] > 0:
                r = float(torch.exp(batch.logprobs[i, t].detach() - batch.old_logprobs[i, t]))
                w = min(max(r, low), high)
                total = total - w * batch.advantages[i, t] * batch.logprobs[i, t]
                count += 1
    return total / count


@pytest.mark.parametrize("clip_low", [None, 0.2])
def test_value_and_gradient_match_the_reference(clip_low):
    batch = make_batch()
    out = CISPOLoss(clip_low=clip_low)(batch)
    out.loss.backward()
    ref_batch = make_batch()
    ref = reference(ref_batch, 0.0 if clip_low is None else 1 - clip_low, 5.0)
    ref.backward()
    assert out.loss.item() == pytest.approx(ref.item(), rel=1e-6)
    torch.testing.assert_close(batch.logprobs.grad, ref_batch.logprobs.grad, rtol=1e-5, atol=1e-7)


def test_clipped_tokens_keep_a_gradient_scaled_by_the_capped_weight():
    batch = make_batch()
    out = CISPOLoss(clip_low=0.2, clip_high=0.2)(batch)
    out.loss.backward()
    n = 6
    # d loss / d logp_t = -w_t A_t / n, w_t = clip(r_t, 0.8, 1.2)
    r = torch.exp(torch.tensor(LOG_R, dtype=torch.float64))
    w = r.clamp(0.8, 1.2)
    expected = torch.where(torch.tensor(MASK) > 0, -w * torch.tensor(ADV, dtype=torch.float64) / n, 0.0)
    torch.testing.assert_close(batch.logprobs.grad, expected, rtol=1e-5, atol=1e-7)
    # PPO zeroes the token with r = 7.39, A > 0 and the one with r = 0.05, A < 0; CISPO does not.
    assert batch.logprobs.grad[0, 1] != 0 and batch.logprobs.grad[1, 0] != 0
    ppo_batch = make_batch()
    PPOClipLoss()(ppo_batch).loss.backward()
    assert ppo_batch.logprobs.grad[0, 1] == 0 and ppo_batch.logprobs.grad[1, 0] == 0
    # clip regions: r > 1.2 at (0,1); r < 0.8 at (0,2), (1,0); (1,1) r = 1.35 > 1.2
    assert out.metrics["clip_frac_high"].item() == pytest.approx(2 / n)
    assert out.metrics["clip_frac_low"].item() == pytest.approx(2 / n)
    assert out.metrics["is_weight_mean"].item() == pytest.approx(float(w[torch.tensor(MASK) > 0].mean()))


def test_default_has_no_lower_bound_and_caps_at_five():
    batch = make_batch()
    out = CISPOLoss()(batch)
    assert out.metrics["clip_frac_low"].item() == 0.0
    assert out.metrics["clip_frac_high"].item() == pytest.approx(1 / 6)  # r = 7.39 > 5
    out.loss.backward()
    assert batch.logprobs.grad[0, 1].item() == pytest.approx(-5.0 * 1.0 / 6)
    assert batch.logprobs.grad[1, 0].item() == pytest.approx(-torch.exp(torch.tensor(-3.0)).item() * -0.5 / 6)


def test_on_policy_gradient_is_reinforce():
    zeros = [[0.0] * 4, [0.0] * 4]
    batch = make_batch(log_r=zeros)
    out = CISPOLoss()(batch)
    out.loss.backward()
    adv = torch.tensor(ADV, dtype=torch.float64)
    mask = torch.tensor(MASK) > 0
    assert out.loss.item() == pytest.approx(float(-(adv * -0.9)[mask].sum() / 6))
    torch.testing.assert_close(batch.logprobs.grad, torch.where(mask, -adv / 6, 0.0), rtol=1e-5, atol=1e-7)
    ppo_batch = make_batch(log_r=zeros)
    PPOClipLoss()(ppo_batch).loss.backward()
    torch.testing.assert_close(batch.logprobs.grad, ppo_batch.logprobs.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("pad_value", [float("nan"), float("inf")])
def test_padding_is_inert(pad_value):
    clean, dirty = make_batch(), make_batch(pad_value=pad_value)
    dirty.advantages[torch.tensor(MASK) == 0] = float("inf")
    a, b = CISPOLoss()(clean), CISPOLoss()(dirty)
    a.loss.backward()
    b.loss.backward()
    assert b.loss.item() == pytest.approx(a.loss.item(), rel=1e-6)
    torch.testing.assert_close(dirty.logprobs.grad, clean.logprobs.grad, rtol=1e-5, atol=1e-7)


def test_bad_bounds_name_the_option():
    with pytest.raises(ValueError, match="clip_low"):
        CISPOLoss(clip_low=1.0)
    with pytest.raises(ValueError, match="clip_high"):
        CISPOLoss(clip_high=0.0)
