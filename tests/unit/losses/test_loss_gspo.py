"""GSPOLoss against a plain per-sequence reference: values, gradients, the sequence-level clip, padding."""

import math

import pytest
import torch

from egspo.losses import ESPOLoss, GSPOLoss, TokenBatch, group_token_log_ratio


def make_batch(log_r, adv, mask, old=-1.1, pad_value=0.0):
    log_r, mask = torch.tensor(log_r, dtype=torch.float64), torch.tensor(mask)
    old_lp = torch.full(log_r.shape, old, dtype=torch.float64)
    logprobs = torch.where(mask > 0, old_lp + log_r, torch.full_like(log_r, pad_value))
    return TokenBatch(
        logprobs=logprobs.requires_grad_(),
        old_logprobs=old_lp,
        advantages=torch.tensor(adv, dtype=torch.float64),
        entropy=torch.ones(log_r.shape),
        mask=mask,
    )


def reference(logprobs, old, adv, mask, eps_l, eps_h):
    """Plain loops: per response s_i = exp(mean log r), PPO on s_i per token, seq-mean-token-mean."""
    losses = []
    for i in range(mask.shape[0]):
        idx = [t for t in range(mask.shape[1]) if mask[i, t] > 0]
        if not idx:
            continue
        log_s = sum(float(logprobs[i, t].detach() - old[i, t]) for t in idx) / len(idx)
        terms = []
        for t in idx:
            # GSPO-token: value s_i, d/dlogp_t = s_i (written out with the autograd trick)
            s = torch.exp(log_s + logprobs[i, t] - logprobs[i, t].detach())
            a = adv[i, t]
            terms.append(torch.minimum(s * a, s.clamp(1 - eps_l, 1 + eps_h) * a))
        losses.append(-sum(terms) / len(idx))
    return sum(losses) / len(losses)


LOG_R = [[0.0002, 0.0001, 0.0004, 0.0, 0.0], [0.003, -0.001, 0.0, 0.0, 0.0], [-0.002, -0.004, 0.0, 0.0, 0.0]]
ADV = [[1.0] * 5, [0.5] * 5, [-2.0] * 5]
MASK = [[1.0, 1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0, 0.0]]


def test_value_and_gradient_match_the_per_sequence_reference():
    batch = make_batch(LOG_R, ADV, MASK)
    out = GSPOLoss()(batch)
    out.loss.backward()
    grad = batch.logprobs.grad.clone()
    lp = batch.logprobs.detach().clone().requires_grad_()
    ref = reference(lp, batch.old_logprobs, batch.advantages, batch.mask, 3e-4, 4e-4)
    ref.backward()
    assert out.loss.item() == pytest.approx(ref.item(), rel=1e-6)
    torch.testing.assert_close(grad, lp.grad, rtol=1e-5, atol=1e-7)


def test_clip_acts_on_whole_sequences_exactly_where_the_formula_says():
    # s_0 = exp(0.7e-3/3) = 1.000233 < 1 + 4e-4: kept; s_1 = exp(2e-3/3) = 1.00067 > 1 + 4e-4, A > 0:
    # clipped; s_2 = exp(-3e-3) = 0.997 < 1 - 3e-4, A < 0: clipped.
    batch = make_batch(LOG_R, ADV, MASK)
    out = GSPOLoss()(batch)
    out.loss.backward()
    s0 = math.exp(0.0007 / 3)
    expected = (-s0 * 1.0 - (1 + 4e-4) * 0.5 - (1 - 3e-4) * -2.0) / 3
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)
    grad = batch.logprobs.grad
    # Only sequence 0 moves, every one of its tokens by -s_0 * A / n_0 / 3 sequences.
    torch.testing.assert_close(
        grad[0, :3], torch.full((3,), -s0 / 3 / 3, dtype=torch.float64), rtol=1e-5, atol=1e-7
    )
    assert torch.all(grad[1:] == 0) and torch.all(grad[0, 3:] == 0)
    assert out.metrics["seq_clip_frac"].item() == pytest.approx(2 / 3)
    assert out.metrics["clip_frac_high"].item() == pytest.approx(3 / 8)
    assert out.metrics["clip_frac_low"].item() == pytest.approx(2 / 8)


def test_on_policy_value_and_gradient():
    adv = [[0.3] * 5, [-1.2] * 5, [2.0] * 5]
    batch = make_batch([[0.0] * 5] * 3, adv, MASK)
    out = GSPOLoss()(batch)
    out.loss.backward()
    assert out.loss.item() == pytest.approx(-(0.3 - 1.2 + 2.0) / 3)
    # s = 1: d loss / d logp_t = -A_i / n_i / 3
    expected = torch.tensor(
        [[-0.3 / 9] * 3 + [0, 0], [1.2 / 9] * 3 + [0, 0], [-2.0 / 6] * 2 + [0, 0, 0]], dtype=torch.float64
    )
    torch.testing.assert_close(batch.logprobs.grad, expected, rtol=1e-5, atol=1e-7)
    assert out.metrics["ratio_mean"].item() == pytest.approx(1.0)


@pytest.mark.parametrize("pad_value", [float("nan"), float("inf"), -1e30])
def test_padding_is_inert(pad_value):
    clean = make_batch(LOG_R, ADV, MASK)
    dirty = make_batch(LOG_R, ADV, MASK, pad_value=pad_value)
    dirty.advantages[torch.tensor(MASK) == 0] = float("nan")
    a, b = GSPOLoss()(clean), GSPOLoss()(dirty)
    a.loss.backward()
    b.loss.backward()
    assert b.loss.item() == pytest.approx(a.loss.item(), rel=1e-6)
    torch.testing.assert_close(dirty.logprobs.grad, clean.logprobs.grad, rtol=1e-5, atol=1e-7)
    assert torch.all(dirty.logprobs.grad[torch.tensor(MASK) == 0] == 0)


def test_sequence_ratio_does_not_grow_with_length():
    # The same per-token log-ratio on 2 and on 8 tokens: the same s_i (geometric mean), same clip.
    short = make_batch([[0.01] * 2 + [0.0] * 6], [[1.0] * 8], [[1.0] * 2 + [0.0] * 6])
    long = make_batch([[0.01] * 8], [[1.0] * 8], [[1.0] * 8])
    loss = GSPOLoss(clip_low=0.2, clip_high=0.2)
    assert loss(short).loss.item() == pytest.approx(loss(long).loss.item(), rel=1e-6)
    assert loss(long).metrics["ratio_mean"].item() == pytest.approx(math.exp(0.01))


def test_shared_ratio_code_is_espo_with_one_group():
    # ESPO with rho = 1 puts every token in the high group: one group per sequence, as GSPO. With
    # GSPO's clip range equal to ESPO's eps (alpha scaled), the two losses agree.
    gen = torch.Generator().manual_seed(3)
    log_r = (torch.randn(3, 5, generator=gen, dtype=torch.float64) * 0.05).tolist()
    batch = make_batch(log_r, ADV, MASK)
    batch.entropy = torch.full((3, 5), math.log(8))  # eps_g = alpha * H / log|V| = alpha
    espo = ESPOLoss(high_entropy_fraction=1.0, alpha=0.03, vocab_size=8)(batch).loss
    gspo = GSPOLoss(clip_low=0.03, clip_high=0.03)(batch).loss
    assert gspo.item() == pytest.approx(espo.item(), rel=1e-6)
    log_ratio = batch.logprobs - batch.old_logprobs
    mask = batch.mask > 0
    token = group_token_log_ratio(log_ratio, batch.logprobs, mask.unsqueeze(0))
    per_seq = (log_ratio * mask).sum(-1) / mask.sum(-1)
    torch.testing.assert_close(
        token.detach()[mask], per_seq[:, None].expand(3, 5)[mask], rtol=1e-5, atol=1e-7
    )


def test_defaults_are_the_papers():
    loss = GSPOLoss()
    assert (loss.clip_low, loss.clip_high, loss.loss_agg_mode, loss.dual_clip) == (
        3e-4,
        4e-4,
        "seq-mean-token-mean",
        None,
    )
    with pytest.raises(ValueError, match="clip_low"):
        GSPOLoss(clip_low=1.5)
