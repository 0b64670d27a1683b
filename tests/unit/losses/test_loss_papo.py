import math

import pytest
import torch

from egspo.losses import PAPOLoss, PolicyLoss, PPOClipLoss, TokenBatch
from egspo.ops import fused_logprobs_entropy

# Row 0: A>0 with P>0 (contracting), A>0 with P<0 (expanding), A<0 with P>0 (expanding),
#        A<0 with P<0 (contracting). Row 1: A>0 with P=0 (neutral), A<0 clipped low, then padding.
RATIOS = [[1.0, 1.1, 0.9, 1.05], [1.0, 0.5, 1.0, 1.0]]
ADV = [[1.0, 2.0, -1.0, -0.5], [1.0, -1.0, 0.0, 0.0]]
POLARITY = [[0.3, -0.2, 0.4, -0.1], [0.0, 0.5, 9.0, 9.0]]
MASK = [[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]]
EXPAND = torch.tensor([[False, True, True, False], [False, True, False, False]])
CONTRACT = torch.tensor([[True, False, False, True], [False, False, False, False]])


def make_batch(ratios=RATIOS, adv=ADV, polarity=POLARITY, mask=MASK):
    old = torch.full((len(ratios), len(ratios[0])), -0.9)
    return TokenBatch(
        logprobs=(old + torch.log(torch.tensor(ratios))).requires_grad_(),
        old_logprobs=old,
        advantages=torch.tensor(adv),
        entropy=torch.ones_like(old),
        mask=torch.tensor(mask),
        polarity=None if polarity is None else torch.tensor(polarity),
    )


def grad_of(loss_fn, batch):
    out = loss_fn(batch)
    out.loss.backward()
    return out, batch.logprobs.grad


def with_balance(balance: float, **kwargs) -> PAPOLoss:
    loss_fn = PAPOLoss(**kwargs)
    loss_fn.load_state_dict({"balance": balance})
    return loss_fn


def test_branch_weights_scale_the_ppo_gradient():
    out, grad = grad_of(with_balance(0.3), make_batch())
    ppo_out, ppo_grad = grad_of(PPOClipLoss(), make_batch())
    valid = torch.tensor(MASK) > 0
    weights = torch.where(EXPAND, 1.3, torch.where(CONTRACT, 0.7, 1.0))
    torch.testing.assert_close(grad[valid], weights[valid] * ppo_grad[valid])
    assert ppo_grad[0].abs().min() > 0  # every branch of row 0 is tested
    m = out.metrics
    assert m["polarity_frac_expand"].item() == pytest.approx(3 / 6)
    assert m["polarity_frac_contract"].item() == pytest.approx(2 / 6)
    assert m["polarity_weight_expand"].item() == pytest.approx(1.3)
    assert m["polarity_weight_contract"].item() == pytest.approx(0.7)
    adv, pol = torch.tensor(ADV), torch.tensor(POLARITY)
    predicted = (weights * -adv * pol)[valid].mean()
    assert m["predicted_entropy_change"].item() == pytest.approx(predicted.item())
    torch.testing.assert_close(m["clip_frac_low"], ppo_out.metrics["clip_frac_low"])
    assert "observed_entropy_change" not in m and "entropy_reference" not in m


def test_weighting_is_advantage_reweighting():
    """``w * PPO(A) = PPO(w * A)`` for ``w > 0``: the same loss as PPO on reweighted advantages."""
    out, grad = grad_of(with_balance(-0.4, dual_clip=3.0), make_batch())
    weights = torch.where(EXPAND, 0.6, torch.where(CONTRACT, 1.4, 1.0))
    reweighted = make_batch(adv=(weights * torch.tensor(ADV)).tolist())
    ppo_out, ppo_grad = grad_of(PPOClipLoss(dual_clip=3.0), reweighted)
    torch.testing.assert_close(out.loss, ppo_out.loss)
    torch.testing.assert_close(grad, ppo_grad)


def test_zero_balance_is_exactly_ppo():
    out, grad = grad_of(PAPOLoss(), make_batch())
    ppo_out, ppo_grad = grad_of(PPOClipLoss(), make_batch())
    assert torch.equal(out.loss, ppo_out.loss)
    assert torch.equal(grad, ppo_grad)


def test_missing_polarity_is_an_error():
    with pytest.raises(ValueError, match="with_polarity"):
        PAPOLoss()(make_batch(polarity=None))
    assert PAPOLoss.needs_polarity and not PolicyLoss.needs_polarity


def test_controller_follows_the_entropy_trajectory():
    loss_fn = PAPOLoss(gain=1.0, ema_decay=0.5, max_balance=0.5)
    assert loss_fn.prepare(torch.full((10,), 2.0)) is None  # not gated
    assert loss_fn.balance == 0.0  # first batch: the reference is itself
    loss_fn.prepare(torch.full((10,), 1.8))  # entropy falls below its EMA (2.0): favour expanding
    assert loss_fn.balance == pytest.approx(0.1, abs=1e-6)
    out = loss_fn(make_batch())
    assert out.metrics["polarity_weight_expand"] > out.metrics["polarity_weight_contract"]
    assert out.metrics["observed_entropy_change"].item() == pytest.approx(-0.2)
    assert out.metrics["entropy_reference"].item() == pytest.approx(2.0)
    # EMA is now 1.9; entropy rises above it: the balance moves back towards contracting
    loss_fn.prepare(torch.full((10,), 2.3))
    assert loss_fn.balance == pytest.approx(0.1 - 0.4 / 1.9, abs=1e-6)  # float32 means
    assert loss_fn.balance < 0
    for _ in range(20):  # a collapse saturates at max_balance, both branches still weighted
        loss_fn.prepare(torch.full((10,), 0.1))
    assert loss_fn.balance == 0.5
    assert loss_fn(make_batch()).metrics["polarity_weight_contract"].item() == pytest.approx(0.5)


def test_controller_with_a_target_entropy():
    loss_fn = PAPOLoss(target_entropy=1.0, gain=0.5)
    loss_fn.prepare(torch.tensor([0.5, 0.7]))  # below target
    assert loss_fn.balance == pytest.approx(0.5 * 0.4)
    loss_fn.prepare(torch.tensor([1.4, 1.6]))  # above target
    assert loss_fn.balance == pytest.approx(0.2 - 0.25)
    before = loss_fn.state_dict()
    loss_fn.prepare(torch.zeros(0))  # no valid token: no step
    assert loss_fn.state_dict() == before


def test_state_dict_round_trip_restores_the_same_loss():
    loss_fn = PAPOLoss(ema_decay=0.8)
    for mean in (2.0, 1.7, 1.5):
        loss_fn.prepare(torch.tensor([mean - 0.1, mean + 0.1]))
    state = loss_fn.state_dict()
    assert all(isinstance(v, float) for v in state.values())
    restored = PAPOLoss(ema_decay=0.8)
    restored.load_state_dict(state)
    assert restored.state_dict() == state
    a, b = loss_fn(make_batch()), restored(make_batch())
    assert torch.equal(a.loss, b.loss)
    assert a.metrics.keys() == b.metrics.keys()
    loss_fn.prepare(torch.tensor([1.0]))
    restored.prepare(torch.tensor([1.0]))
    assert restored.state_dict() == loss_fn.state_dict()
    with pytest.raises(ValueError, match="gate"):
        restored.load_state_dict({"gate": 0.5})


def test_predicted_direction_holds_on_a_softmax_policy():
    """One on-policy step on tabular logits: positive balance raises the entropy above PPO's, negative
    lowers it below, as the first-order polarity predicts."""
    gen = torch.Generator().manual_seed(5)
    states, vocab = 64, 12
    logits = torch.randn(states, vocab, generator=gen, dtype=torch.float64) * 2
    actions = torch.multinomial(torch.softmax(logits, -1), 1, generator=gen).squeeze(1)
    advantages = torch.randn(states, generator=gen, dtype=torch.float64)
    eye = torch.eye(vocab, dtype=torch.float64)
    polarity = fused_logprobs_entropy(logits, eye, actions, with_polarity=True).polarity

    def entropy_after_step(loss_fn: PolicyLoss) -> float:
        z = logits.clone().requires_grad_(True)
        logp = torch.log_softmax(z, -1).gather(1, actions[:, None])  # [states, 1]
        batch = TokenBatch(
            logprobs=logp,
            old_logprobs=logp.detach(),
            advantages=advantages[:, None],
            entropy=torch.zeros_like(logp),
            mask=torch.ones_like(logp),
            polarity=polarity[:, None],
        )
        loss_fn(batch).loss.backward()
        stepped = torch.log_softmax(logits - 0.05 * z.grad, -1)
        return -(stepped.exp() * stepped).sum(-1).mean().item()

    ppo = entropy_after_step(PPOClipLoss())
    assert entropy_after_step(with_balance(0.5)) > ppo > entropy_after_step(with_balance(-0.5))


@pytest.mark.parametrize(
    ("kwargs", "option"),
    [
        ({"target_entropy": 0.0}, "target_entropy"),
        ({"target_entropy": math.inf}, "target_entropy"),
        ({"ema_decay": 1.0}, "ema_decay"),
        ({"gain": -1.0}, "gain"),
        ({"max_balance": 1.0}, "max_balance"),
        ({"clip_low": 1.0}, "clip_low"),
    ],
)
def test_invalid_arguments_name_the_option(kwargs, option):
    with pytest.raises(ValueError, match=option):
        PAPOLoss(**kwargs)
