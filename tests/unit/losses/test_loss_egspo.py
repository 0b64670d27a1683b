import math

import pytest
import torch

from egspo.losses import EGSPOLoss, EntropyGate, HasEntropyGate, PPOClipLoss, TokenBatch
from egspo.losses.gate import _quantile

# Row 0: r=1 (inside), clipped high, inside with A<0, inside with A<0.
RATIOS = [[1.0, 1.5, 0.9, 1.1], [0.95, 1.05, 1.0, 1.0]]
ADV = [[1.0, 1.0, -1.0, -2.0], [0.5, -1.0, 0.0, 0.0]]
ENTROPY = [[2.0, 0.5, 1.5, 0.2], [0.1, 3.0, 99.0, 99.0]]
MASK = [[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]]
HIGH = torch.tensor([[True, False, True, False], [False, True, False, False]])  # H >= 1.0


def make_batch(ratios=RATIOS, adv=ADV, entropy=ENTROPY, mask=MASK, threshold=None):
    old = torch.full((len(ratios), len(ratios[0])), -0.7)
    return TokenBatch(
        logprobs=(old + torch.log(torch.tensor(ratios))).requires_grad_(),
        old_logprobs=old,
        advantages=torch.tensor(adv),
        entropy=torch.tensor(entropy),
        mask=torch.tensor(mask),
        entropy_threshold=threshold,
    )


def grad_of(loss_fn, batch):
    """Loss and gradient, with the gate threshold from ``loss_fn.prepare`` unless the batch has one."""
    if batch.entropy_threshold is None:
        batch.entropy_threshold = loss_fn.prepare(batch.entropy[batch.mask > 0])
    out = loss_fn(batch)
    out.loss.backward()
    return out, batch.logprobs.grad


def absolute_gate(value=1.0, **kwargs):
    return EntropyGate(rule="absolute", value=value, **kwargs)


def test_high_entropy_tokens_get_ppo_gradient_low_entropy_tokens_phi_times_it():
    out, grad = grad_of(EGSPOLoss(gate=absolute_gate(), low_entropy_weight=0.1), make_batch())
    ppo_out, ppo_grad = grad_of(PPOClipLoss(), make_batch())
    torch.testing.assert_close(grad[HIGH], ppo_grad[HIGH], rtol=0, atol=0)
    torch.testing.assert_close(grad[~HIGH], 0.1 * ppo_grad[~HIGH])
    assert ppo_grad[0, 3] != 0 and ppo_grad[1, 0] != 0  # the comparison is not vacuous
    # w * PPO over valid tokens, gated-out tokens still in the denominator (6)
    objectives = torch.tensor([1.0, 1.2, -0.9, -2.2, 0.475, -1.05])
    weights = torch.tensor([1.0, 0.1, 1.0, 0.1, 0.1, 1.0])
    assert out.loss.item() == pytest.approx(-(weights * objectives).sum().item() / 6)
    m = out.metrics
    assert m["gate_threshold"].item() == 1.0
    assert m["gate_frac_high"].item() == pytest.approx(3 / 6)
    assert m["gate_frac_low"].item() == pytest.approx(3 / 6)
    assert m["gate_weight_mean"].item() == pytest.approx(weights.mean().item())
    torch.testing.assert_close(m["clip_frac_high"], ppo_out.metrics["clip_frac_high"])


@pytest.mark.parametrize(
    "loss_fn",
    [
        EGSPOLoss(gate=absolute_gate(), low_entropy_weight=1.0),
        EGSPOLoss(gate=absolute_gate(0.0), low_entropy_weight=0.1),
        EGSPOLoss(gate=EntropyGate(value=0.0), low_entropy_weight=0.3, dual_clip=3.0),
    ],
    ids=["phi=1", "all-above-absolute", "all-above-quantile"],
)
def test_reduces_exactly_to_ppo(loss_fn):
    out, grad = grad_of(loss_fn, make_batch())
    ppo = PPOClipLoss(dual_clip=loss_fn.dual_clip)
    ppo_out, ppo_grad = grad_of(ppo, make_batch())
    assert torch.equal(out.loss, ppo_out.loss)
    assert torch.equal(grad, ppo_grad)


@pytest.mark.parametrize("low_entropy_weight", [0.1, "p(1-p)"])
@pytest.mark.parametrize("entropy", [5.0, 0.01], ids=["full-branch", "attenuated-branch"])
def test_negative_advantage_token_is_pushed_down_in_both_branches(entropy, low_entropy_weight):
    batch = make_batch(ratios=[[1.0]], adv=[[-1.0]], entropy=[[entropy]], mask=[[1.0]])
    loss_fn = EGSPOLoss(gate=absolute_gate(), low_entropy_weight=low_entropy_weight)
    _, grad = grad_of(loss_fn, batch)
    stepped = batch.logprobs.detach() - 0.1 * grad
    assert stepped.item() < batch.logprobs.item()


def test_quantile_gate_selects_top_fifth_of_valid_tokens_only():
    gen = torch.Generator().manual_seed(3)
    entropy = torch.full((2, 8), 1e6)  # padding entropies must not move the quantile
    valid_entropy = torch.randperm(10, generator=gen).float()
    mask = torch.zeros(2, 8)
    mask[0, :6] = 1
    mask[1, :4] = 1
    entropy[mask > 0] = valid_entropy
    batch = make_batch(
        ratios=torch.ones(2, 8).tolist(),
        adv=torch.ones(2, 8).tolist(),
        entropy=entropy.tolist(),
        mask=mask.tolist(),
    )
    out, grad = grad_of(EGSPOLoss(low_entropy_weight=0.25), batch)
    assert out.metrics["gate_threshold"].item() == pytest.approx(7.2)  # 0.8 * (10 - 1) between 7 and 8
    assert out.metrics["gate_frac_high"].item() == pytest.approx(0.2)
    full = (entropy >= 8) & (mask > 0)
    assert int(full.sum()) == 2
    torch.testing.assert_close(grad[full], torch.full((2,), -1 / 10))
    torch.testing.assert_close(grad[(mask > 0) & ~full], torch.full((8,), -0.25 / 10))
    assert torch.all(grad[mask == 0] == 0)


def test_quantile_matches_torch_quantile():
    gen = torch.Generator().manual_seed(0)
    for n in (1, 2, 7, 100):
        x = torch.rand(n, generator=gen)
        for q in (0.0, 0.2, 0.5, 0.8, 1.0):
            torch.testing.assert_close(_quantile(x, q), torch.quantile(x, q))


def test_soft_gate_weight_is_sigmoid_interpolation():
    gate = absolute_gate(soft=True, temperature=0.5)
    _, grad = grad_of(EGSPOLoss(gate=gate, low_entropy_weight=0.2), make_batch())
    _, ppo_grad = grad_of(PPOClipLoss(), make_batch())
    entropy = torch.tensor(ENTROPY)
    weights = 0.2 + 0.8 * torch.sigmoid((entropy - 1.0) / 0.5)
    valid = torch.tensor(MASK) > 0
    torch.testing.assert_close(grad[valid], weights[valid] * ppo_grad[valid])


def test_chord_phi_weight_uses_stopped_p_times_one_minus_p():
    batch = make_batch()
    _, grad = grad_of(EGSPOLoss(gate=absolute_gate(), low_entropy_weight="p(1-p)"), batch)
    _, ppo_grad = grad_of(PPOClipLoss(), make_batch())
    p = torch.exp(batch.logprobs.detach())
    low = ~HIGH & (torch.tensor(MASK) > 0)
    torch.testing.assert_close(grad[low], (p * (1 - p))[low] * ppo_grad[low])
    torch.testing.assert_close(grad[HIGH], ppo_grad[HIGH])


def test_the_batch_threshold_is_used_not_recomputed():
    batch = make_batch(threshold=torch.tensor(2.5))
    out, grad = grad_of(EGSPOLoss(gate=absolute_gate(0.0), low_entropy_weight=0.1), batch)
    _, ppo_grad = grad_of(PPOClipLoss(), make_batch())
    assert out.metrics["gate_threshold"].item() == 2.5
    assert out.metrics["gate_frac_high"].item() == pytest.approx(1 / 6)  # only H=3.0
    only = torch.zeros(2, 4, dtype=torch.bool)
    only[1, 1] = True
    torch.testing.assert_close(grad[only], ppo_grad[only])
    torch.testing.assert_close(grad[~only], 0.1 * ppo_grad[~only])


def test_gate_rules_and_scheduled_value():
    entropy = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0, 50.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0, 0.0]])
    gate = EntropyGate(value=0.5)
    assert gate.threshold(entropy, mask).item() == pytest.approx(2.0)
    assert gate.threshold(entropy[mask > 0]).item() == pytest.approx(2.0)  # 1-D valid values, as prepare
    gate.set_value(0.25)  # a scheduler changes it during training
    assert gate.threshold(entropy, mask).item() == pytest.approx(1.0)
    normalized = EntropyGate(rule="normalized", value=0.5, vocab_size=1000)
    assert normalized.threshold(entropy, mask).item() == pytest.approx(0.5 * math.log(1000))
    assert EntropyGate(rule="absolute", value=1.5).threshold(entropy, mask).item() == 1.5
    assert EntropyGate().threshold(entropy, torch.zeros_like(mask)).item() == 0.0
    assert EntropyGate().threshold(torch.zeros(0)).item() == 0.0


@pytest.mark.parametrize(
    ("rule", "value", "error"),
    [
        ("quantile", 2.0, ValueError),
        ("quantile", float("nan"), ValueError),
        ("absolute", -1.0, ValueError),
        ("absolute", float("inf"), ValueError),
        ("quantile", "0.5", TypeError),
        ("quantile", True, TypeError),
        ("quantile", torch.tensor(0.5), TypeError),
    ],
)
def test_set_value_is_validated_and_leaves_the_gate_unchanged_on_error(rule, value, error):
    gate = EntropyGate(rule=rule, value=0.5)
    with pytest.raises(error, match="gate value"):
        gate.set_value(value)
    assert gate.value == 0.5
    gate.set_value(1)
    assert gate.value == 1.0 and isinstance(gate.value, float)


def test_normalized_gate_vocab_size_is_filled_by_setup():
    loss_fn = EGSPOLoss(gate=EntropyGate(rule="normalized", value=0.5))
    with pytest.raises(ValueError, match="vocab_size"):
        loss_fn.prepare(torch.ones(3))
    loss_fn.setup(vocab_size=1000, max_completion_length=16)
    assert loss_fn.prepare(torch.ones(3)).item() == pytest.approx(0.5 * math.log(1000))
    explicit = EGSPOLoss(gate=EntropyGate(rule="normalized", value=0.5, vocab_size=64))
    explicit.setup(vocab_size=1000, max_completion_length=16)
    assert explicit.gate.vocab_size == 64  # an option set explicitly is kept


def test_prepare_is_the_gate_threshold_over_the_rollout_batch():
    loss_fn = EGSPOLoss()
    entropy = torch.rand(100, generator=torch.Generator().manual_seed(4)) * 3
    torch.testing.assert_close(loss_fn.prepare(entropy), torch.quantile(entropy, 0.8))
    assert PPOClipLoss().prepare(entropy) is None


def test_missing_threshold_is_an_error_not_a_local_fallback():
    with pytest.raises(ValueError, match="prepare"):
        EGSPOLoss()(make_batch())


def test_gated_losses_satisfy_the_gate_protocol():
    assert isinstance(EGSPOLoss(), HasEntropyGate)
    assert not isinstance(PPOClipLoss(), HasEntropyGate)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"value": 1.5}, "gate value"),
        ({"value": -0.1}, "gate value"),
        ({"rule": "absolute", "value": -1.0}, "gate value"),
        ({"rule": "normalized", "value": 0.5, "vocab_size": 1}, "vocab_size"),
        ({"rule": "topk"}, "gate rule"),
        ({"soft": True, "temperature": 0.0}, "temperature"),
    ],
)
def test_gate_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        EntropyGate(**kwargs)


@pytest.mark.parametrize("phi", [1.5, -0.1, "p*(1-p)"])
def test_low_entropy_weight_validation(phi):
    with pytest.raises(ValueError, match="low_entropy_weight"):
        EGSPOLoss(low_entropy_weight=phi)


def test_default_gates_are_not_shared():
    a, b = EGSPOLoss(), EGSPOLoss()
    a.gate.set_value(0.5)
    assert b.gate.value == 0.8
