"""Rollout-training mismatch: the metrics, the truncated importance weights, the sequence mask, and
that every policy loss multiplies each token's policy-gradient term by its weight."""

from __future__ import annotations

import math

import pytest
import torch

from egspo import losses
from egspo.losses import (
    MismatchCorrection,
    TokenBatch,
    default_correction,
    mismatch_metrics,
    rollout_correction,
)
from egspo.rollout import HFGenerateEngine, SharedPrefillEngine

MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.float32)


def _logprobs(seed: int = 0) -> torch.Tensor:
    return -torch.rand(MASK.shape, generator=torch.Generator().manual_seed(seed)) * 3


# --- the correction on hand-made tensors ---------------------------------------------------------


def test_agreeing_logprobs_give_weights_of_exactly_one_and_zero_metrics():
    old = _logprobs()
    out = rollout_correction(old, old.clone(), MASK, MismatchCorrection())
    assert torch.equal(out.is_weights, torch.ones_like(old))
    assert not out.rejected.any()
    for name in (
        "mismatch/logprob_abs_diff_mean",
        "mismatch/logprob_abs_diff_max",
        "mismatch/k3_kl",
        "mismatch/ratio_out_of_range_frac",
        "mismatch/is_truncated_frac",
        "mismatch/rs_rejected_frac",
    ):
        assert float(out.metrics[name]) == 0.0, name
    assert float(out.metrics["mismatch/is_weight_mean"]) == 1.0


def test_weights_are_the_ratio_truncated_at_the_cap():
    old = torch.zeros(1, 4)
    sampler = torch.tensor([[math.log(4.0), 0.0, math.log(0.8), -5.0]])  # ratios 1/4, 1, 1.25, e^5
    mask = torch.ones(1, 4)
    out = rollout_correction(
        old, sampler, mask, MismatchCorrection(rollout_is_threshold=2.0, rollout_rs=None)
    )
    assert torch.allclose(out.is_weights, torch.tensor([[0.25, 1.0, 1.25, 2.0]]))
    assert float(out.metrics["mismatch/is_truncated_frac"]) == 0.25
    assert out.rejected is None


def test_padding_is_inert_even_when_it_holds_inf_or_nan():
    old, sampler = _logprobs(0), _logprobs(1)
    reference = rollout_correction(old, sampler, MASK, MismatchCorrection())
    junk_old, junk_sampler = old.clone(), sampler.clone()
    junk_old[MASK == 0] = float("nan")
    junk_sampler[MASK == 0] = -float("inf")
    out = rollout_correction(junk_old, junk_sampler, MASK, MismatchCorrection())
    assert torch.equal(out.is_weights, reference.is_weights)
    assert (out.is_weights[MASK == 0] == 1).all()
    assert torch.equal(out.rejected, reference.rejected)
    for name, value in reference.metrics.items():
        assert torch.equal(out.metrics[name], value), name


def test_sequence_mask_drops_exactly_the_rows_whose_geometric_mean_ratio_is_out_of_range():
    old = torch.zeros(4, 3)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1], [0, 0, 0]], dtype=torch.float32)
    # mean log-ratios (old - sampler): row 0: +0.02 (ratio 1.0202 > 1.01), row 1: -0.005 (kept),
    # row 2: -0.03 (0.9704 < 1/1.01), row 3: no valid token (kept; its junk is ignored).
    sampler = torch.tensor([[-0.02, -0.02, -0.02], [0.0, 0.01, 9.0], [0.09, 0.0, 0.0], [5.0, 5.0, 5.0]])
    out = rollout_correction(
        old, sampler, mask, MismatchCorrection(rollout_is=None, rollout_rs_threshold=1.01)
    )
    assert out.rejected.tolist() == [True, False, True, False]
    assert out.is_weights is None
    assert float(out.metrics["mismatch/rs_rejected_frac"]) == pytest.approx(2 / 3)
    bounds = MismatchCorrection(rollout_rs_threshold=1.05, rollout_rs_threshold_lower=0.9)
    assert rollout_correction(old, sampler, mask, bounds).rejected.tolist() == [False, False, False, False]


def test_metrics_follow_their_formulas():
    old = torch.tensor([[0.0, 0.0, -1.0]])
    sampler = torch.tensor([[-1.0, 0.5, -1.0]])  # d = log mu - logp_old = -1, 0.5, 0
    mask = torch.ones(1, 3)
    m = mismatch_metrics(old, sampler, mask)
    assert float(m["mismatch/logprob_abs_diff_mean"]) == pytest.approx(0.5)
    assert float(m["mismatch/logprob_abs_diff_max"]) == pytest.approx(1.0)
    k3 = ((math.exp(-1) + 1 - 1) + (math.exp(0.5) - 0.5 - 1)) / 3
    assert float(m["mismatch/k3_kl"]) == pytest.approx(k3, rel=1e-5)
    assert float(m["mismatch/ratio_out_of_range_frac"]) == pytest.approx(1 / 3)  # ratio e^1 only


def test_bad_option_is_refused_in_one_line():
    for kwargs in ({"rollout_is_threshold": 0.5}, {"rollout_rs_threshold": 1.0}, {"rollout_is": "seq"}):
        with pytest.raises(ValueError, match=r"^model\.rollout\.mismatch_correction\.\w+=[^\n]*$"):
            MismatchCorrection(**kwargs)


def test_on_by_default_only_for_engines_that_do_not_score_what_they_sample():
    assert not default_correction(HFGenerateEngine()).enabled
    assert not default_correction(SharedPrefillEngine()).enabled

    class Sampler:
        scores_what_it_samples = False

    assert default_correction(Sampler()) == MismatchCorrection()


# --- every policy loss: weight w_t multiplies token t's policy-gradient term ---------------------


def _policy_losses() -> list:
    """One instance of every concrete policy loss egspo exports (a new loss is covered by itself)."""
    abstract = {losses.PolicyLoss, losses.ClippedPolicyLoss, getattr(losses, "CovariancePolicyLoss", None)}
    classes = [
        c
        for name in losses.__all__
        if isinstance(c := getattr(losses, name), type)
        and issubclass(c, losses.PolicyLoss)
        and c not in abstract
    ]
    return [
        *(c() for c in classes),
        losses.PPOClipLoss(clip_high=0.28, dual_clip=3.0, loss_agg_mode="seq-mean-token-sum"),
    ]


LOSSES = _policy_losses()


def _batch(weights: torch.Tensor | None, logprobs: torch.Tensor, spread: float = 0.4) -> TokenBatch:
    """Ratios on both sides of the clips (`spread` 0.4), or all close to 1 (GSPO's tight clip)."""
    g = torch.Generator().manual_seed(5)
    old = logprobs.detach() + spread * torch.randn(MASK.shape, generator=g)
    advantages = torch.tensor([1.0, -0.7, 0.4])[:, None].expand_as(MASK)
    entropy = torch.rand(MASK.shape, generator=g) * 2
    return TokenBatch(
        logprobs=logprobs,
        old_logprobs=old,
        advantages=advantages,
        entropy=entropy,
        mask=MASK,
        entropy_threshold=torch.tensor(1.0),
        polarity=torch.randn(MASK.shape, generator=g),
        is_weights=weights,
    )


def _ready(loss, batch: TokenBatch):
    """What the trainer does once per rollout batch before calling a loss."""
    loss.setup(vocab_size=50, max_completion_length=MASK.shape[1])
    if loss.needs_rollout_tokens:
        valid = MASK > 0
        loss.prepare_rollout_tokens(batch.old_logprobs[valid], batch.advantages[valid])
    return loss


def _name(loss) -> str:
    return type(loss).__name__


def test_every_exported_policy_loss_is_covered():
    names = {_name(loss) for loss in LOSSES}
    assert {"PPOClipLoss", "EGSPOLoss", "ESPOLoss", "CEGPPOLoss", "PAPOLoss"} <= names


@pytest.mark.parametrize("loss", LOSSES, ids=_name)
def test_weights_change_no_value_and_unit_weights_change_nothing(loss):
    logprobs = _logprobs()
    _ready(loss, _batch(None, logprobs))
    plain = loss(_batch(None, logprobs))
    ones = loss(_batch(torch.ones_like(MASK), logprobs))
    weighted = loss(_batch(torch.rand(MASK.shape) * 2, logprobs))
    assert torch.equal(plain.loss, ones.loss)
    assert torch.equal(plain.loss, weighted.loss), "values (ratios, clips, gates) stay the trainer's"
    for name, value in plain.metrics.items():
        assert torch.equal(value, weighted.metrics[name]), name


@pytest.mark.parametrize("loss", LOSSES, ids=_name)
def test_each_tokens_gradient_is_scaled_by_its_weight(loss):
    weights = torch.rand(MASK.shape, generator=torch.Generator().manual_seed(9)) * 2 + 0.05
    weights[MASK == 0] = float("nan")  # padding is inert
    _ready(loss, _batch(None, _logprobs()))

    def grad(w: torch.Tensor | None, spread: float) -> torch.Tensor:
        logprobs = _logprobs().requires_grad_(True)
        loss(_batch(w, logprobs, spread)).loss.backward()
        return logprobs.grad

    valid = MASK > 0
    carried = False
    for spread in (0.4, 1e-5):
        plain, weighted = grad(None, spread), grad(weights, spread)
        carried |= bool((plain[valid] != 0).any())
        assert torch.allclose(weighted[valid], (weights * plain)[valid], atol=1e-7)
        assert (weighted[~valid] == 0).all()
    assert carried, "some token should carry gradient"


def test_ppo_gradient_is_that_of_the_weighted_token_objective():
    """For PPO: the gradient of `-mean_t(w_t * PPO_t)`, the truncated-IS loss as verl writes it."""
    loss = losses.PPOClipLoss()
    weights = torch.tensor([[0.5, 2.0, 1.0, 1.0], [1.5, 0.1, 1.0, 1.0], [1.0, 1.0, 0.3, 2.0]])
    logprobs = _logprobs().requires_grad_(True)
    batch = _batch(weights, logprobs)
    loss(batch).loss.backward()
    got = logprobs.grad

    logprobs = _logprobs().requires_grad_(True)
    ratio = torch.exp(logprobs - batch.old_logprobs)
    a = batch.advantages
    ppo = torch.minimum(ratio * a, ratio.clamp(0.8, 1.2) * a)
    (-(weights * ppo)[MASK > 0].mean()).backward()
    assert torch.allclose(got, logprobs.grad, atol=1e-7)
