import math

import pytest
import torch

from egspo.losses import ChordPhiLoss, NLLLoss

LOGP = [[-1.0, -2.0, float("nan")], [-0.5, float("-inf"), 1e30]]
MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])


def run(loss_fn):
    logprobs = torch.tensor(LOGP, requires_grad=True)
    out = loss_fn(logprobs, MASK)
    out.loss.backward()
    return out, logprobs.grad


def test_nll_hand_values():
    out, grad = run(NLLLoss())
    assert out.loss.item() == pytest.approx(3.5 / 3)
    assert out.metrics["nll"].item() == pytest.approx(3.5 / 3)
    torch.testing.assert_close(grad, -MASK / 3)


def test_nll_sequence_mean():
    out, _ = run(NLLLoss(loss_agg_mode="seq-mean-token-mean"))
    assert out.loss.item() == pytest.approx((1.5 + 0.5) / 2)
    assert out.metrics["nll"].item() == pytest.approx(3.5 / 3)


def test_chord_phi_weights_nll_by_stopped_p_times_one_minus_p():
    out, grad = run(ChordPhiLoss())
    phi = [math.exp(x) * (1 - math.exp(x)) for x in (-1.0, -2.0, -0.5)]
    assert out.loss.item() == pytest.approx((phi[0] * 1.0 + phi[1] * 2.0 + phi[2] * 0.5) / 3)
    assert out.metrics["phi_weight_mean"].item() == pytest.approx(sum(phi) / 3)
    assert out.metrics["nll"].item() == pytest.approx(3.5 / 3)
    expected = torch.tensor([[-phi[0], -phi[1], 0.0], [-phi[2], 0.0, 0.0]]) / 3
    torch.testing.assert_close(grad, expected)


def test_sft_rejects_unknown_mode_and_missing_constant():
    with pytest.raises(ValueError, match="loss_agg_mode"):
        ChordPhiLoss(loss_agg_mode="mean")
    with pytest.raises(ValueError, match="norm_constant"):
        NLLLoss(loss_agg_mode="seq-mean-token-sum-norm")
    out, _ = run(NLLLoss(loss_agg_mode="seq-mean-token-sum-norm", norm_constant=2.0))
    assert out.loss.item() == pytest.approx((3.0 / 2 + 0.5 / 2) / 2)
