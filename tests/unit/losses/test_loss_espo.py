import math

import pytest
import torch

from egspo.losses import ESPOLoss, TokenBatch

V = 8
LOG_V = math.log(V)
# Seq 0: 5 tokens, rho=0.4 -> high group = the 2 highest entropies (positions 1, 3).
# Seq 1: 2 valid tokens, rho*n = 0.8 -> ceil -> 1 high token (position 1), then padding.
LOG_R = [[0.0, 0.01, -0.02, 0.01, 0.05], [-0.1, 0.0, 0.0, 0.0, 0.0]]
ENTROPY = [[0.1, 2.0, 0.3, 1.5, 0.2], [0.5, 0.7, 9.0, 9.0, 9.0]]
ADV = [[1.0] * 5, [-1.0, -1.0, 0.0, 0.0, 0.0]]
MASK = [[1.0] * 5, [1.0, 1.0, 0.0, 0.0, 0.0]]


def make_batch(log_r=LOG_R, entropy=ENTROPY, adv=ADV, mask=MASK):
    old = torch.full((len(log_r), len(log_r[0])), -1.3)
    return TokenBatch(
        logprobs=(old + torch.tensor(log_r)).requires_grad_(),
        old_logprobs=old,
        advantages=torch.tensor(adv),
        entropy=torch.tensor(entropy),
        mask=torch.tensor(mask),
    )


def test_hand_computed_loss_gradients_and_metrics():
    batch = make_batch()
    out = ESPOLoss(high_entropy_fraction=0.4, alpha=0.02, vocab_size=V)(batch)
    out.loss.backward()
    # seq 0, high {1,3}: s = exp(0.01) = 1.01005 < 1 + eps_h, eps_h = 0.02 * 1.75 / ln 8 = 0.01683: unclipped.
    #        low {0,2,4}: s = exp(0.01) > 1 + eps_l, eps_l = 0.02 * 0.2 / ln 8 = 0.00192: clipped at 1 + eps_l.
    eps_h0, eps_l0 = 0.02 * 1.75 / LOG_V, 0.02 * 0.2 / LOG_V
    seq0 = -(math.exp(0.01) + (1 + eps_l0)) / 2
    # seq 1, high {1}: s = 1, A = -1: unclipped, objective -1.
    #        low {0}: s = exp(-0.1) < 1 - eps_l, eps_l = 0.02 * 0.5 / ln 8, A < 0: clipped at 1 - eps_l.
    eps_h1, eps_l1 = 0.02 * 0.7 / LOG_V, 0.02 * 0.5 / LOG_V
    seq1 = -(-1.0 - (1 - eps_l1)) / 2
    assert out.loss.item() == pytest.approx((seq0 + seq1) / 2, rel=1e-6)
    # gradient of an unclipped token: -s_g * A / |g| / (groups in sequence) / (sequences)
    expected = torch.zeros(2, 5)
    expected[0, [1, 3]] = -math.exp(0.01) / 2 / 2 / 2
    expected[1, 1] = 1.0 / 1 / 2 / 2
    torch.testing.assert_close(batch.logprobs.grad, expected)
    m = out.metrics
    assert m["clip_frac_high"].item() == pytest.approx(3 / 7)
    assert m["clip_frac_low"].item() == pytest.approx(1 / 7)
    assert m["high_entropy_frac"].item() == pytest.approx(3 / 7)
    assert m["eps_high_entropy_group"].item() == pytest.approx((eps_h0 + eps_h1) / 2)
    assert m["eps_low_entropy_group"].item() == pytest.approx((eps_l0 + eps_l1) / 2)


def test_group_ratio_is_geometric_mean_of_token_ratios():
    gen = torch.Generator().manual_seed(1)
    log_r = (torch.randn(1, 6, generator=gen) * 0.05).tolist()
    entropy = [[0.3, 2.5, 0.1, 1.9, 0.2, 2.2]]
    adv = [[0.7, -0.4, 1.3, 0.9, -1.1, 0.5]]
    batch = make_batch(log_r, entropy, adv, [[1.0] * 6])
    # alpha large enough that nothing is clipped: the gradient then reads off s_g directly.
    ESPOLoss(high_entropy_fraction=0.5, alpha=5.0, vocab_size=V)(batch).loss.backward()
    ratios = torch.exp(torch.tensor(log_r))[0]
    for group in ([1, 3, 5], [0, 2, 4]):
        geometric_mean = ratios[group].prod() ** (1 / len(group))
        s_g = -batch.logprobs.grad[0, group] * len(group) * 2 / torch.tensor(adv)[0, group]
        torch.testing.assert_close(s_g, geometric_mean.expand(3))


def test_clip_range_follows_alpha_times_normalized_group_entropy():
    # One group per sequence (rho=1); A > 0 and s = exp(0.01) = 1.01005, eps = 0.02 * H / ln 8:
    # H=1.0 -> eps 0.00962 < 0.01005 (clipped); H=1.2 -> eps 0.01154 > 0.01005 (unclipped).
    batch = make_batch(
        log_r=[[0.01, 0.01], [0.01, 0.01]],
        entropy=[[1.0, 1.0], [1.2, 1.2]],
        adv=[[1.0, 1.0], [1.0, 1.0]],
        mask=[[1.0, 1.0], [1.0, 1.0]],
    )
    out = ESPOLoss(high_entropy_fraction=1.0, alpha=0.02, vocab_size=V)(batch)
    out.loss.backward()
    assert torch.all(batch.logprobs.grad[0] == 0)
    assert torch.all(batch.logprobs.grad[1] < 0)
    assert out.metrics["eps_high_entropy_group"].item() == pytest.approx(0.02 * 1.1 / LOG_V)


@pytest.mark.parametrize(("n", "k"), [(1, 1), (3, 1), (5, 1), (6, 2), (10, 2), (11, 3), (20, 4)])
def test_high_group_size_is_ceil_of_fraction_at_least_one(n, k):
    entropy = torch.full((1, 24), 100.0)  # padding entropies are larger than any valid one
    entropy[0, :n] = torch.arange(n).float()
    mask = torch.zeros(1, 24)
    mask[0, :n] = 1
    high = ESPOLoss(vocab_size=V).high_entropy_groups(entropy, mask)
    assert int(high.sum()) == k
    assert torch.equal(high[0].nonzero().flatten(), torch.arange(n - k, n))


def test_empty_sequence_does_not_dilute_the_mean():
    batch = make_batch()
    padded = make_batch(
        log_r=[*LOG_R, [0.3] * 5],
        entropy=[*ENTROPY, [1.0] * 5],
        adv=[*ADV, [1.0] * 5],
        mask=[*MASK, [0.0] * 5],
    )
    loss_fn = ESPOLoss(high_entropy_fraction=0.4, vocab_size=V)
    assert loss_fn(padded).loss.item() == pytest.approx(loss_fn(batch).loss.item())


@pytest.mark.parametrize(
    ("kwargs", "option"),
    [
        ({"high_entropy_fraction": 0.0}, "high_entropy_fraction"),
        ({"alpha": -1.0}, "alpha"),
        ({"vocab_size": 1}, "vocab_size"),
    ],
)
def test_invalid_arguments_name_the_option(kwargs, option):
    with pytest.raises(ValueError, match=option):
        ESPOLoss(**{"vocab_size": V, **kwargs})


def test_vocab_size_is_filled_by_setup():
    loss_fn = ESPOLoss(high_entropy_fraction=0.4)
    with pytest.raises(ValueError, match="setup"):
        loss_fn(make_batch())
    loss_fn.setup(vocab_size=V, max_completion_length=5)
    expected = ESPOLoss(high_entropy_fraction=0.4, vocab_size=V)(make_batch()).loss
    assert torch.equal(loss_fn(make_batch()).loss, expected)
    explicit = ESPOLoss(vocab_size=V)
    explicit.setup(vocab_size=1000, max_completion_length=5)
    assert explicit.vocab_size == V  # an option set explicitly is kept
