import math

import pytest
import torch

from egspo.losses import AGG_MODES, aggregate, aggregation_units, kl_penalty

NAN, INF = float("nan"), float("inf")
VALUES = torch.tensor([[1.0, 2.0, 3.0, NAN], [5.0, INF, -INF, 1e30]])
MASK = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])


@pytest.mark.parametrize(
    ("mode", "norm_constant", "expected"),
    [
        ("token-mean", None, (1 + 2 + 3 + 5) / 4),
        ("seq-mean-token-mean", None, (6 / 3 + 5 / 1) / 2),
        ("seq-mean-token-sum", None, (6 + 5) / 2),
        ("seq-mean-token-sum-norm", 2.0, (6 / 2 + 5 / 2) / 2),
    ],
)
def test_aggregate_hand_values_ignore_padding(mode, norm_constant, expected):
    assert aggregate(VALUES, MASK, mode, norm_constant=norm_constant).item() == pytest.approx(expected)


@pytest.mark.parametrize("mode", AGG_MODES)
def test_aggregate_empty_rows_do_not_dilute_and_get_no_gradient(mode):
    values = torch.cat([VALUES, torch.full((1, 4), 7.0)]).requires_grad_()
    mask = torch.cat([MASK, torch.zeros(1, 4)])
    full = aggregate(values, mask, mode, norm_constant=4.0)
    assert full.item() == pytest.approx(aggregate(VALUES, MASK, mode, norm_constant=4.0).item())
    full.backward()
    assert torch.all(values.grad[mask == 0] == 0)


@pytest.mark.parametrize("mode", AGG_MODES)
def test_aggregate_all_zero_mask_gives_zero_without_nan(mode):
    values = torch.full((2, 3), INF, requires_grad=True)
    out = aggregate(values, torch.zeros(2, 3), mode, norm_constant=3.0)
    out.backward()
    assert out.item() == 0.0
    assert torch.all(values.grad == 0)


def test_aggregate_token_mean_gradient_is_one_over_token_count():
    values = torch.zeros(2, 4, requires_grad=True)
    aggregate(values, MASK).backward()
    torch.testing.assert_close(values.grad, MASK / 4)


def test_aggregate_rejects_unknown_mode_and_missing_constant():
    with pytest.raises(ValueError, match="loss_agg_mode"):
        aggregate(VALUES, MASK, "sum")
    with pytest.raises(ValueError, match="norm_constant"):
        aggregate(VALUES, MASK, "seq-mean-token-sum-norm", norm_constant=0.0)
    with pytest.raises(ValueError, match="norm_constant"):  # never the batch width
        aggregate(VALUES, MASK, "seq-mean-token-sum-norm")


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("token-mean", 4),
        ("seq-mean-token-mean", 2),
        ("seq-mean-token-sum", 2),
        ("seq-mean-token-sum-norm", 2),
    ],
)
def test_aggregation_units_are_the_denominator(mode, expected):
    mask = torch.cat([MASK, torch.zeros(1, 4)])  # an empty row counts for no mode
    assert aggregation_units(mask, mode).item() == expected
    with pytest.raises(ValueError, match="loss_agg_mode"):
        aggregation_units(mask, "sum")


LOGP = torch.tensor([[-1.0, -2.0]])
REF = torch.tensor([[-1.5, -1.0]])  # d = ref - logp = [-0.5, 1.0]


@pytest.mark.parametrize(
    ("estimator", "expected"),
    [
        ("k1", [0.5, -1.0]),
        ("k2", [0.125, 0.5]),
        ("k3", [math.exp(-0.5) - 1 + 0.5, math.e - 2]),
    ],
)
def test_kl_estimators_hand_values(estimator, expected):
    torch.testing.assert_close(kl_penalty(LOGP, REF, estimator), torch.tensor([expected]))


def test_kl_gradients_wrt_logprobs():
    logp = LOGP.clone().requires_grad_()
    kl_penalty(logp, REF, "k3").sum().backward()
    d = REF - LOGP
    torch.testing.assert_close(logp.grad, 1 - torch.exp(d))  # d/dlogp (e^d - 1 - d)
    logp.grad = None
    kl_penalty(logp, REF, "k2").sum().backward()
    torch.testing.assert_close(logp.grad, -d)


def test_k3_is_nonnegative_and_clamped():
    gen = torch.Generator().manual_seed(0)
    logp = torch.randn(64, 32, generator=gen) * 3
    ref = torch.randn(64, 32, generator=gen) * 3
    k3 = kl_penalty(logp, ref, "k3")
    assert torch.all(k3 >= 0)
    extreme = kl_penalty(torch.tensor([[-100.0, 0.0]]), torch.tensor([[0.0, -1e4]]), "k3")
    assert torch.isfinite(extreme).all()
    assert extreme.max().item() == 10.0


def test_kl_rejects_unknown_estimator():
    with pytest.raises(ValueError, match="kl_estimator"):
        kl_penalty(LOGP, REF, "k4")
